"""Resumable transfer: a broker restart or a dead responder mid-transfer does not restart
the download from zero."""

from __future__ import annotations

from pathlib import Path

import pytest

import edge_sdk
from edge_sdk.transport import FetchConfig, SlowRetrievalError
from tests._broker import Mosquitto
from tests._trust_env import EvilResponder, env

CHUNK = 32 * 1024


def test_broker_restart_mid_transfer_completes_and_resends_at_most_one_window(
        tmp_path: Path, broker: Mosquitto) -> None:
    cfg = FetchConfig(chunk_size=CHUNK, window=8, chunk_timeout=2.0)
    with env(tmp_path, broker) as e:
        art = e.release(n=1_000_000)  # a 4 MB model
        dep = e.deploy()
        responder = e.responders[0]
        # Baseline: what one clean transfer costs the responder, measured, not guessed.
        e.client(cfg).fetch(dep, tmp_path / "baseline")
        baseline = responder.stats.bytes_sent
        e.state = tmp_path / "device2"
        responder.stats.bytes_sent = 0
        client = e.client(cfg)
        restarted: list[int] = []

        def progress(done: int, total: int) -> None:
            if not restarted and done > total // 3:
                restarted.append(done)
                broker.restart()

        path = client.fetch(dep, tmp_path / "installed", progress=progress)
        assert restarted, "the broker was never restarted"
        installed = edge_sdk.Artifact.from_dir(path)
        assert installed.manifest.sha256 == art.manifest.sha256
        assert client.stats.reconnects >= 1
        assert responder.stats.bytes_sent - baseline <= cfg.window * CHUNK
        # Lost with the link: a window, asked for again at most twice; and one chunk per
        # retransmit timeout (a loaded machine stalls answers past the RTO now and then).
        assert client.stats.chunks_resent <= 2 * cfg.window + client.stats.timeouts


def test_transfer_broken_by_a_dead_responder_resumes_from_the_partial_file(
        tmp_path: Path, broker: Mosquitto) -> None:
    cfg = FetchConfig(chunk_size=CHUNK, window=4, chunk_timeout=0.5, stall_timeout=1.5)
    with env(tmp_path, broker, responder=False) as e:
        art = e.release(n=250_000)  # ~1 MB
        size = art.manifest.size_bytes
        dep = e.deploy()
        cut = e.add_responder(EvilResponder(e.host, e.repo.path, "cut", cut_at=size // 2))
        first = e.client(cfg)
        with pytest.raises(SlowRetrievalError, match="partial download kept"):
            first.fetch(dep, tmp_path / "installed")
        assert not (tmp_path / "installed").exists()
        partial = first.partial_dir / f"{art.manifest.sha256}.part"
        kept = partial.stat().st_size
        assert kept >= size // 2 - CHUNK
        cut.mode = "honest"
        second = e.client(cfg)
        path = second.fetch(dep, tmp_path / "installed")
        assert edge_sdk.Artifact.from_dir(path).manifest.sha256 == art.manifest.sha256
        assert art.sample_path is not None
        sample = art.sample_path.stat().st_size
        metadata_slack = 64 * 1024
        # Only the rest of the model (plus the sample and metadata) came over again.
        assert second.stats.bytes_received <= size - kept + sample + metadata_slack
        assert not partial.exists()
