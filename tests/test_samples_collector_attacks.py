"""Attacks on the device's sample collector: outputs and inputs that are no plain
tensors (text, ZipMap maps) never wedge a request or get pickled."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

import edge_sdk
from device_agent._config import AgentConfig
from device_agent._samples import SampleCollector, confidence
from device_agent._serving import Served
from device_agent._state import ModelRecord
from edge_sdk.samples import SampleStatus
from edge_sdk.transport import Topics
from tests import _samples as S
from tests._process import wait_for
from tests._quality import manifest

DEV = "dev-1"


class _Collector:
    def __init__(self, tmp: Path) -> None:
        art = S.classifier(tmp)
        self.model = Served(edge_sdk.load(art.path, threads=1),
                            ModelRecord("cls-1", "cls", "1", art.manifest.sha256))
        self.config = AgentConfig.from_dict({"device_id": DEV, "fleet": "lab",
                                             "state_dir": str(tmp / "state")})
        (tmp / "state").mkdir(exist_ok=True)
        self.signer = CryptoSigner.generate_ed25519()
        self.topics = Topics("lab")
        self.sent: list[tuple[str, bytes, bool]] = []
        self.stop = threading.Event()
        self.c = SampleCollector(
            self.config, self.config.state_dir, self.topics,
            lambda t, p, r: self.sent.append((t, p, r)), lambda kind, **f: None,
            key=lambda: self.signer.public_key,
            served=lambda name: self.model if name == "cls" else None, stop=self.stop)
        self.c.start()

    def status(self, rid: str) -> SampleStatus | None:
        topic = self.topics.samples_status(DEV)
        mine = [s for s in (SampleStatus.from_bytes(p) for t, p, _ in list(self.sent)
                            if t == topic) if s.id == rid]
        return mine[-1] if mine else None


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[_Collector]:
    c = _Collector(tmp_path)
    yield c
    c.stop.set()
    c.c.stop()


def _final(c: _Collector, rid: str) -> SampleStatus:
    def final() -> SampleStatus | None:
        st = c.status(rid)
        return st if st is not None and st.state != "collecting" else None

    got: SampleStatus = wait_for(final, 20, lambda: str(c.status(rid)))
    return got


def test_text_and_zipmap_outputs_are_bundled_without_pickles(collector: _Collector) -> None:
    req = S.request(DEV, rule="disagreement", count=2, outputs=True)
    collector.c.on_request("", S.signed(req, collector.signer))
    wait_for(lambda: collector.status(req.id) is not None, 10)
    x = np.concatenate([S.row(1.0), S.row(2.0)])
    outputs: dict[str, Any] = {
        "label": np.array(["cat", "dog"], dtype=object),  # a tensor(string) output
        "probs": [{"cat": 0.9, "dog": 0.1}, {"cat": 0.2, "dog": 0.8}],  # ZipMap
        "score": np.array([[0.9], [0.8]], np.float32)}
    collector.c.offer("cls", {"x": x}, outputs, score=0.3)
    st = _final(collector, req.id)
    assert (st.state, st.count) == ("ready", 2), st
    bundle = collector.config.state_dir / "samples" / req.id / "bundle.npz"
    with np.load(bundle, allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    assert got["out.label"].tolist() == ["cat", "dog"] and "out.probs" not in got
    assert got["out.score"].shape == (2, 1)


def test_a_text_input_is_kept_as_text(collector: _Collector) -> None:
    req = S.request(DEV, rule="disagreement", count=1)
    collector.c.on_request("", S.signed(req, collector.signer))
    wait_for(lambda: collector.status(req.id) is not None, 10)
    collector.c.offer("cls", {"x": np.array([["a b c"]], dtype=object)}, {}, score=0.1)
    st = _final(collector, req.id)
    assert (st.state, st.count) == ("ready", 1), st


def test_a_kept_sample_that_cannot_be_read_back_ends_the_request(
        collector: _Collector) -> None:
    req = S.request(DEV, rule="disagreement", count=2)
    collector.c.on_request("", S.signed(req, collector.signer))
    wait_for(lambda: collector.status(req.id) is not None, 10)
    collector.c.offer("cls", {"x": S.row(1.0)}, {}, score=0.1)
    root = collector.config.state_dir / "samples" / req.id
    kept = wait_for(lambda: sorted(root.glob("s*.npz")), 10)
    kept[0].write_bytes(b"PK\x03\x04 torn by a power cut")
    collector.c.offer("cls", {"x": S.row(2.0)}, {}, score=0.1)
    st = _final(collector, req.id)
    assert st.state == "refused" and "cannot bundle" in st.reason


def test_low_confidence_reads_class_scores_not_the_label_output_before_them() -> None:
    m = manifest([("label", "int64", ("N",)), ("probabilities", "float32", ("N", 3))],
                  task="classify")
    probs = np.array([[0.4, 0.35, 0.25], [0.9, 0.05, 0.05]], np.float32)
    got = confidence(m, {"label": np.array([0, 0], np.int64), "probabilities": probs}, 2)
    np.testing.assert_allclose(got, [0.4, 0.9], rtol=1e-6)


def test_low_confidence_of_a_binary_score_is_its_distance_from_the_cut() -> None:
    m = manifest([("p", "float32", ("N", 1))], task="classify")
    got = confidence(m, {"p": np.array([[0.55], [0.02]], np.float32)}, 2)
    np.testing.assert_allclose(got, [0.55, 0.98], rtol=1e-6)
    logits = confidence(m, {"p": np.array([[0.0], [-4.0]], np.float32)}, 2)
    np.testing.assert_allclose(logits, [0.5, 1 / (1 + np.exp(-4.0))], rtol=1e-6)
