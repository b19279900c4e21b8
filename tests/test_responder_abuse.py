"""Abuse of the repository responder by a device with valid credentials, on a real
Mosquitto with the example ACL and a real ``edge-sdk serve`` subprocess: aiming the
responder at another device, flooding it, and out-of-range offsets and lengths."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import edge_sdk
from edge_sdk.release import Repository
from edge_sdk.transport import MAX_CHUNK, ChunkClient, FetchConfig, MqttConnection, Topics
from edge_sdk.transport import _chunks as proto
from tests._acl import FLEET, connect_as, example_broker
from tests._broker import Mosquitto
from tests._trust_env import make_artifact

EDGE_SDK = str(Path(sys.executable).with_name("edge-sdk"))
TOPICS = Topics(FLEET)
KiB, MiB = 1024, 1024 * 1024


class Responses:
    """Every chunk response on one device's topic, decoded, with the time of the last one."""

    def __init__(self, conn: MqttConnection, device: str) -> None:
        self.items: list[proto.ChunkResponse] = []
        self.times: list[float] = []
        self.wire_bytes = 0
        self.last_at = 0.0
        self.cond = threading.Condition()
        conn.subscribe(TOPICS.repo_response(device), self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.items.append(proto.ChunkResponse.decode(payload))
            self.wire_bytes += len(payload)
            self.last_at = time.monotonic()
            self.times.append(self.last_at)
            self.cond.notify_all()

    def for_corr(self, corr: bytes, timeout: float = 10) -> list[proto.ChunkResponse]:
        with self.cond:
            assert self.cond.wait_for(lambda: any(r.corr == corr for r in self.items), timeout)
            return [r for r in self.items if r.corr == corr]

    def quiet(self, for_s: float = 1.0, limit: float = 60) -> None:
        """Wait until nothing arrived for ``for_s`` seconds."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            with self.cond:
                if self.items and time.monotonic() - self.last_at > for_s:
                    return
            time.sleep(0.1)
        raise AssertionError("responses never stopped")

    def ok_bytes(self, since: float = 0.0, until: float = float("inf")) -> int:
        """Chunk bytes that arrived between ``since`` and ``until``."""
        with self.cond:
            return sum(len(r.payload) for r, t in zip(self.items, self.times, strict=True)
                       if r.status == proto.OK and since <= t <= until)

    def slowed(self, why: str) -> int:
        """``SLOW_DOWN`` answers whose reason says ``why``."""
        with self.cond:
            return sum(r.status == proto.SLOW_DOWN and why in r.reason for r in self.items)


class Setup:
    def __init__(self, broker: Mosquitto, creds: dict[str, str], repo: Repository,
                 target: str, size: int, data: bytes) -> None:
        self.broker, self.creds, self.repo = broker, creds, repo
        self.target, self.size, self.data = target, size, data


@contextlib.contextmanager
def make_setup(tmp_path: Path, devices: Sequence[str] = ("d1", "d2"), *,
               queues: bool = False) -> Iterator[Setup]:
    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    art = make_artifact(tmp_path / "arts", "m", "1.0", n=600_000, sample=False)  # 2.4 MB
    rel = repo.add_artifact(art.path)
    d, _, base = rel.path.rpartition("/")
    with example_broker(tmp_path, {dev: [] for dev in devices}, queues=queues) \
            as (broker, creds):
        yield Setup(broker, creds, repo, f"targets/{d}/{rel.sha256}.{base}", rel.length,
                    art.model_path.read_bytes())


@pytest.fixture()
def setup(tmp_path: Path) -> Iterator[Setup]:
    with make_setup(tmp_path) as s:
        yield s


@contextlib.contextmanager
def serve(s: Setup, tmp: Path, *limits: str, args: Sequence[str] = ()
          ) -> Iterator[subprocess.Popen[str]]:
    """``edge-sdk serve`` as the example's ``edge-repo`` user (``args`` appended); yields
    the process. Its log is ``tmp/serve.log``."""
    log = tmp / "serve.log"
    args = [EDGE_SDK, "serve", "--repo", str(s.repo.path), "--broker", s.broker.url,
            "--fleet", FLEET, "--username", "edge-repo", "--password", s.creds["edge-repo"],
            *args]
    for lim in limits:
        args += ["--device-limit", lim]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stderr=out, text=True)
    try:
        end = time.monotonic() + 30
        while "serving" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < end, "edge-sdk serve did not start"
            time.sleep(0.05)
        yield proc
        assert proc.poll() is None, f"edge-sdk serve died: {log.read_text()[-2000:]}"
    finally:
        proc.terminate()
        proc.wait(10)


def request(conn: MqttConnection, device: str, path: str, off: Any = 0, length: Any = MAX_CHUNK,
            n: Any = 1, **extra: Any) -> bytes:
    corr = secrets.token_bytes(16)
    doc = {"v": 1, "id": corr.hex(), "path": path, "off": off, "len": length, "n": n, **extra}
    conn.publish(TOPICS.repo_request(device), json.dumps(doc).encode())
    return corr


def test_chunk_requests_naming_another_device_are_never_answered_to_it(
        setup: Setup, tmp_path: Path) -> None:
    a = connect_as(setup.broker, setup.creds, "d1")
    b = connect_as(setup.broker, setup.creds, "d2")
    try:
        to_a, to_b = Responses(a, "d1"), Responses(b, "d2")
        with serve(setup, tmp_path):
            # A publishes on B's request topic: the ACL drops it at the broker.
            for _ in range(50):
                request(a, "d2", setup.target, n=proto.MAX_BATCH)
            # A names B in the payload (the old "dev" field) on its own topic: the
            # topic says who asks, so the answer goes to A.
            mine = request(a, "d1", "metadata/timestamp.json", dev="d2")
            assert to_a.for_corr(mine)[0].status == proto.OK
            # B's own request, sent after all of A's: once its answer is in, anything
            # A's requests made the responder send B would have arrived before it.
            theirs = request(b, "d2", "metadata/timestamp.json")
            to_b.for_corr(theirs)
            assert {r.corr for r in to_b.items} == {theirs}
            assert to_b.ok_bytes() == (setup.repo.path / "metadata/timestamp.json").stat().st_size
    finally:
        a.close()
        b.close()


def test_request_flood_from_one_device_is_held_to_its_budget(
        setup: Setup, tmp_path: Path) -> None:
    rate, burst = 1 * MiB, 1 * MiB
    limits = (f"bytes_per_s={rate}", f"burst_bytes={burst}", "requests_per_s=50",
              "burst_requests=50", f"max_inflight_bytes={2 * MiB}")
    a = connect_as(setup.broker, setup.creds, "d1")
    try:
        to_a = Responses(a, "d1")
        with serve(setup, tmp_path, *limits):
            # For a 3 s window, as fast as the device can publish: each request asks
            # for the whole file (64 chunks of 127 KiB).
            flood = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3:
                request(a, "d1", setup.target, n=proto.MAX_BATCH)
                flood += 1
                if flood % 500 == 0:
                    time.sleep(0.01)  # let paho's thread write them out
            to_a.quiet()
            elapsed = to_a.last_at - t0
        asked = flood * setup.size
        got = to_a.ok_bytes()
        slowed = sum(r.status == proto.SLOW_DOWN for r in to_a.items)
        sent = flood * len(proto.ChunkRequest(bytes(16), setup.target, 0, MAX_CHUNK,
                                              proto.MAX_BATCH).encode())
        print(f"flood: {flood} requests ({sent} bytes) asked for {asked / MiB:.0f} MiB; "
              f"{got / MiB:.2f} MiB of chunks + {to_a.wire_bytes - got} bytes of headers "
              f"and slow-downs arrived in {elapsed:.2f} s; {slowed} slow-downs, "
              f"{len(to_a.items)} messages")
        # Bytes out are bounded by the burst plus the rate over the flood's own
        # duration (measured, generous margin), far below what was asked for.
        assert burst // 2 <= got <= burst + rate * elapsed * 1.5 + 2 * MAX_CHUNK
        assert got < asked / 100
        # Over the request rate, requests are dropped unanswered: each message that is
        # not a chunk answers one request, and few requests were let through.
        chunks = sum(r.status == proto.OK for r in to_a.items)
        assert len(to_a.items) - chunks <= 50 + 50 * elapsed * 1.5
        assert slowed > 0
    finally:
        a.close()


def test_premature_retries_of_a_chunk_are_dropped_and_urgent_ones_answered(
        setup: Setup, tmp_path: Path) -> None:
    a = connect_as(setup.broker, setup.creds, "d1")
    try:
        to_a = Responses(a, "d1")
        with serve(setup, tmp_path):
            # A device retrying 20 times within its own 5 s RTO (a broken timer, or the
            # old fixed timeouts on a slow link): the chunk is sent once.
            first = request(a, "d1", setup.target, n=4, rto=5000)
            for _ in range(20):
                request(a, "d1", setup.target, n=4, rto=5000)
            # The same chunks with a 1 ms RTO (a device that knows its answers died with
            # the link) come again, and so does a chunk never sent before.
            urgent = request(a, "d1", setup.target, n=5, rto=1)
            to_a.for_corr(urgent)
            to_a.quiet(0.5)
        assert [r.offset for r in to_a.for_corr(first)] == [i * MAX_CHUNK for i in range(4)]
        assert [r.offset for r in to_a.for_corr(urgent)] == [i * MAX_CHUNK for i in range(5)]
        assert {r.corr for r in to_a.items} == {first, urgent}  # the 20 retries got nothing
        assert to_a.ok_bytes() == 9 * MAX_CHUNK
    finally:
        a.close()


def test_one_request_cannot_queue_more_than_the_inflight_cap(
        setup: Setup, tmp_path: Path) -> None:
    cap = 512 * KiB
    a = connect_as(setup.broker, setup.creds, "d1")
    try:
        to_a = Responses(a, "d1")
        with serve(setup, tmp_path, f"max_inflight_bytes={cap}"):
            request(a, "d1", setup.target, n=proto.MAX_BATCH)
            with to_a.cond:
                assert to_a.cond.wait_for(
                    lambda: any(r.status != proto.OK for r in to_a.items), 10)
                got = list(to_a.items)
        data = [r for r in got if r.status == proto.OK]
        assert sum(len(r.payload) for r in data) <= cap
        assert got[-1].status == proto.SLOW_DOWN and got[-1].offset == len(data) * MAX_CHUNK
        assert got[-1].total >= 1 and "slow down" in got[-1].reason
    finally:
        a.close()


def test_fetcher_waits_out_slow_down_answers_and_completes(
        setup: Setup, tmp_path: Path) -> None:
    a = connect_as(setup.broker, setup.creds, "d1")
    try:
        with serve(setup, tmp_path, f"bytes_per_s={2 * MiB}", f"burst_bytes={256 * KiB}",
                   f"max_inflight_bytes={512 * KiB}"):
            client = ChunkClient(a, "d1", config=FetchConfig(stall_timeout=5.0))
            data = bytearray()
            client.download(setup.target, data.extend, length=setup.size)
            assert bytes(data) == setup.data
            # Slowed down, and no chunk ever timed out: the waits came from the answers.
            assert client.stats.slowdowns > 0
            assert client.stats.chunks_resent >= client.stats.slowdowns
    finally:
        a.close()


SHARE = "its share of this responder"


def test_a_lone_device_is_not_held_to_a_share_of_devices_that_stopped_asking(
        tmp_path: Path) -> None:
    # The responder knows three devices; two asked a moment ago and are done. The third
    # downloads alone: it is never told to slow down, though a share of three devices'
    # (a tight slack: one chunk) would hold each of its batches of eight chunks.
    with make_setup(tmp_path, ("d1", "d2", "d3")) as s:
        conns = {d: connect_as(s.broker, s.creds, d) for d in ("d1", "d2", "d3")}
        try:
            with serve(s, tmp_path, f"share_slack_bytes={MAX_CHUNK}", "active_ms=300"):
                for d in ("d2", "d3"):
                    answers = Responses(conns[d], d)
                    answers.for_corr(request(conns[d], d, s.target))
                    assert answers.ok_bytes() == MAX_CHUNK
                time.sleep(0.5)  # past active_ms: d2 and d3 are known, not asking
                client = ChunkClient(conns["d1"], "d1")
                data = bytearray()
                client.download(s.target, data.extend, length=s.size)
            assert bytes(data) == s.data
            assert client.stats.slowdowns == 0
        finally:
            for c in conns.values():
                c.close()


def test_a_flooding_device_is_held_to_its_share_while_an_honest_device_downloads(
        setup: Setup, tmp_path: Path) -> None:
    # d1 asks for the whole file (2.4 MB) every 10 ms, within the request rate, with a
    # 1 ms retransmit timeout so that no retry counts as premature, and reads what comes;
    # d2 downloads the file three times with the default fetcher meanwhile. The slack is
    # one chunk, so that the share is all that holds d1 once d2 asks.
    flooder = connect_as(setup.broker, setup.creds, "d1")
    honest = connect_as(setup.broker, setup.creds, "d2")
    stop = threading.Event()

    def flood() -> None:
        end = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < end:
            request(flooder, "d1", setup.target, n=proto.MAX_BATCH, rto=1)
            time.sleep(0.01)

    try:
        to_flooder = Responses(flooder, "d1")
        with serve(setup, tmp_path, f"share_slack_bytes={MAX_CHUNK}"):
            thread = threading.Thread(target=flood, daemon=True)
            thread.start()
            try:
                with to_flooder.cond:  # the flood is being answered
                    assert to_flooder.cond.wait_for(lambda: to_flooder.items, 10)
                client = ChunkClient(honest, "d2", config=FetchConfig(stall_timeout=10))
                t0 = 0.0
                for i in range(3):
                    data = bytearray()
                    client.download(setup.target, data.extend, length=setup.size)
                    assert bytes(data) == setup.data
                    if i == 0:
                        # Measured from here: what the responder handed to the broker for
                        # d1 before d2 asked (up to its queue bound) still arrives during
                        # d2's first download, and no share can take it back.
                        t0 = time.monotonic()
                t1 = time.monotonic()
            finally:
                stop.set()
                thread.join(5)
        flooded = to_flooder.ok_bytes(t0, t1)
        print(f"during d2's last 2 downloads of {setup.size} bytes: d1 got {flooded} bytes, "
              f"{to_flooder.slowed(SHARE)} share slow-downs; d2 {client.stats}")
        # Held: told to slow down for its share, and it got about what d2 got (1.3-1.4×
        # here), where without the share it got 18× (its whole queue bound, 8 MiB, per
        # request: the queue of the responder was its own).
        assert to_flooder.slowed(SHARE) > 0
        assert flooded <= 2 * 2 * setup.size
    finally:
        flooder.close()
        honest.close()


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("off", 2**70, f"offset {2**70} must be an integer 0..9007199254740991"),
    ("off", -1, "offset -1 must be an integer 0.."),
    ("off", "0", "offset '0' must be an integer"),
    ("off", "past-end", "is past the end of the file"),
    ("len", 0, f"length 0 must be an integer 1..{MAX_CHUNK}"),
    ("len", 2**40, f"length 1099511627776 must be an integer 1..{MAX_CHUNK}"),
    ("n", 0, "'n' 0 must be an integer 1..64"),
    ("n", 10**30, "'n' <100-bit integer> must be"),
], ids=["2**70", "negative", "string", "past-end", "len-0", "len-huge", "n-0", "n-huge"])
def test_out_of_range_offsets_and_lengths_get_clear_errors_and_the_responder_lives(
        setup: Setup, tmp_path: Path, field: str, value: Any, reason: str) -> None:
    a = connect_as(setup.broker, setup.creds, "d1")
    try:
        to_a = Responses(a, "d1")
        with serve(setup, tmp_path):
            if value == "past-end":
                value = setup.size + 1
            corr = request(a, "d1", setup.target, **{field: value})
            (bad,) = to_a.for_corr(corr)
            assert bad.status == proto.BAD_REQUEST and reason in bad.reason, bad.reason
            # Exactly at the end is not an error: an empty chunk (a complete resume).
            end = to_a.for_corr(request(a, "d1", setup.target, off=setup.size))
            assert [(r.status, r.payload, r.total) for r in end] == [(proto.OK, b"", setup.size)]
            # And the responder still serves.
            ok = to_a.for_corr(request(a, "d1", setup.target, off=0, length=1024))
            assert ok[0].status == proto.OK and ok[0].payload == setup.data[:1024]
    finally:
        a.close()


ROOT = Path(__file__).resolve().parents[1]


def start_pull(s: Setup, device: str, tmp: Path) -> subprocess.Popen[str]:
    """``edge-sdk pull`` of the release as ``device`` (its own credentials), running."""
    return subprocess.Popen(
        [EDGE_SDK, "pull", "m", "--root", str(s.repo.path / "metadata" / "root.json"),
         "--device", device, "-q", "-o", str(tmp / f"pulled-{device}"),
         "--state", str(tmp / f"state-{device}"), "--broker", s.broker.url, "--fleet", FLEET,
         "--username", device],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGE_MQTT_PASSWORD": s.creds[device]})


def pulled(s: Setup, device: str, tmp: Path, proc: subprocess.Popen[str],
           timeout: float) -> None:
    """``proc`` (a :func:`start_pull`) succeeds within ``timeout`` s with the released bytes."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{device}'s pull did not finish within {timeout:.0f} s: "
                             f"{err[-500:]}") from None
    assert proc.returncode == 0, f"{device}'s pull failed: {err[-1000:]}"
    assert "verified and wrote" in out
    got = edge_sdk.Artifact.from_dir(tmp / f"pulled-{device}").model_path.read_bytes()
    assert got == s.data


def scrape(url: str) -> dict[str, float]:
    """``name value`` lines of a Prometheus text page (no labels in the responder's)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {k: float(v) for k, _, v in (ln.partition(" ") for ln in text.splitlines())
            if k and not k.startswith("#")}


def metrics_url(log: Path) -> str:
    m = re.search(r"responder metrics on (\S+)", log.read_text())
    assert m, log.read_text()
    return m.group(1)


@pytest.mark.slow
def test_request_flood_from_one_device_leaves_other_devices_pulls_working(
        tmp_path: Path) -> None:
    # One device floods its own request topic for 10 s with valid requests, as fast as
    # its socket goes. Before: the broker dropped the PUBACKs of the responder's QoS 1
    # answers (its queue towards the responder was full of the flood), paho's window
    # stayed full for good and every other device's pull failed until a restart. The
    # broker has the example config's queue limits: the flood fills them within
    # milliseconds, whatever this machine's speed (the test broker's 100000 needs a
    # flood faster than the responder by 100000 requests).
    flood_s = 10
    with make_setup(tmp_path, ("d1", "d2", "d3"), queues=True) as s, \
            serve(s, tmp_path, args=("--only", "responder", "--metrics", "127.0.0.1:0")) \
            as proc:
        flooder = subprocess.Popen(
            [sys.executable, "-m", "tests._mqttflood", "--host", s.broker.host,
             "--port", str(s.broker.port), "--user", "d1", "--password", s.creds["d1"],
             "--fleet", FLEET, "--path", s.target, "--seconds", str(flood_s)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert flooder.stdout is not None
            assert flooder.stdout.readline().strip() == "flooding"
            time.sleep(2)  # the broker's queue towards the responder is full by now
            during = start_pull(s, "d2", tmp_path)
            out, _ = flooder.communicate(timeout=flood_s + 60)
        finally:
            if flooder.poll() is None:
                flooder.kill()
        flood = json.loads(out.splitlines()[-1])
        end = time.monotonic()
        # Right after the flood, another device's pull: within 30 s, same serve process.
        pulled(s, "d3", tmp_path, start_pull(s, "d3", tmp_path), timeout=30)
        after_s = time.monotonic() - end
        # The one that started during the flood completes too (its fetcher's stall
        # timeout, 60 s, is what it may spend without receiving anything).
        pulled(s, "d2", tmp_path, during, timeout=60)
        during_s = time.monotonic() - end
        m = scrape(metrics_url(tmp_path / "serve.log"))
        log = (tmp_path / "serve.log").read_text()
        assert proc.poll() is None
    print(f"flood: {flood}; pull after it: {after_s:.1f} s, pull during it: done "
          f"{during_s:.1f} s after its end; responder: {m}")
    # Most of the flood was dropped unanswered, before any work, and said so in a few
    # lines (one per device per 10 s), not one per request.
    assert m["edge_responder_dropped_requests_total"] > 0
    assert log.count("device d1 is over") <= flood_s // 10 + 3
    assert "device d2" not in log and "device d3" not in log


def test_responder_watchdog_reconnects_when_the_broker_stops_acknowledging(
        setup: Setup, tmp_path: Path) -> None:
    # The broker stops moving (SIGSTOP: the link stays up, nothing is read or answered),
    # as a broker whose queue towards the responder overflows drops its PUBACKs. The
    # responder notices within --stall-timeout, says so in one line, counts it, drops
    # the link and is back serving as soon as the broker is.
    log = tmp_path / "serve.log"
    with serve(setup, tmp_path, args=("--only", "responder", "--stall-timeout", "2",
                                      "--metrics", "127.0.0.1:0")) as proc:
        url = metrics_url(log)
        assert scrape(url)["edge_responder_broker_connected"] == 1
        broker = setup.broker.proc
        assert broker is not None
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            end = time.monotonic() + 30
            while "did not acknowledge the watchdog's probe" not in log.read_text():
                assert time.monotonic() < end, f"no stall noticed: {log.read_text()[-1000:]}"
                time.sleep(0.2)
            stalled = scrape(url)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        pulled(setup, "d2", tmp_path, start_pull(setup, "d2", tmp_path), timeout=60)
        after = scrape(url)
        text = log.read_text()
        assert proc.poll() is None
    assert stalled["edge_responder_stalls_total"] >= 1
    assert stalled["edge_responder_broker_connected"] == 0  # it dropped the link itself
    assert after["edge_responder_broker_connected"] == 1
    lines = [ln for ln in text.splitlines() if "watchdog's probe" in ln]
    assert len(lines) == after["edge_responder_stalls_total"]
    assert "stall_timeout" in lines[0] and "reconnecting" in lines[0]
