"""Field samples without a broker: the signed request (never a profiling request, nor the
other way round), the status document, the rules' scores, and the agent's collector fed
directly (offer() as the shadow runner calls it, the request tap as a request does) with
its bounds on disk."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

import edge_sdk
from device_agent._config import AgentConfig
from device_agent._samples import SampleCollector, confidence, drift_distance
from device_agent._serving import Served
from device_agent._state import ModelRecord
from edge_sdk.profiling import (
    FileRef,
    ProfileCandidate,
    ProfilingRequest,
    ProfilingVerificationError,
    sign_profiling_request,
    verify_profiling_request,
)
from edge_sdk.samples import (
    MalformedSampleRequestError,
    MalformedSampleStatusError,
    SampleNotForThisDeviceError,
    SampleRequestExpiredError,
    SampleRequestTooLargeError,
    SampleSignatureError,
    SampleStatus,
    SampleVerificationError,
    verify_sample_request,
)
from edge_sdk.samples._host import write_calibration
from edge_sdk.transport import Topics
from tests import _samples as S
from tests._process import wait_for

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DEV = "dev-1"


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def verify(payload: bytes, signer: CryptoSigner, **kw: Any) -> Any:
    args: dict[str, Any] = {"device_id": DEV, "fleet": "lab", "now": NOW, **kw}
    return verify_sample_request(payload, signer.public_key, **args)


# -- the request document -------------------------------------------------------------

def test_signed_request_verifies_with_what_it_says(signer: CryptoSigner) -> None:
    req = S.request(DEV, now=NOW, threshold=0.35, outputs=True)
    got = verify(S.signed(req, signer), signer)
    assert replace(got, keyid="") == req
    assert got.keyid == signer.public_key.keyid


def test_profiling_request_never_verifies_as_a_sample_request(signer: CryptoSigner) -> None:
    ref = FileRef("profiling/" + "ab" * 16 + "/m.onnx", "0" * 64, 1)
    prof = ProfilingRequest(fleet="lab", device=DEV, id="ab" * 16, issued=NOW,
                            expires=NOW + timedelta(minutes=5), sample=ref,
                            candidates=(ProfileCandidate("c", ref, ref),))
    with pytest.raises(MalformedSampleRequestError, match="edge-samples-request"):
        verify(sign_profiling_request(prof, [signer]), signer)


def test_sample_request_never_verifies_as_a_profiling_request(signer: CryptoSigner) -> None:
    payload = S.signed(S.request(DEV, now=NOW), signer)
    with pytest.raises(ProfilingVerificationError, match="edge-profiling-request"):
        verify_profiling_request(payload, signer.public_key, device_id=DEV, fleet="lab",
                                 now=NOW)


@pytest.mark.parametrize("change, error, words", [
    ({"device": "dev-2"}, SampleNotForThisDeviceError, "is for 'dev-2'"),
    ({"fleet": "other"}, SampleNotForThisDeviceError, "fleet 'other'"),
    ({"expires": NOW - timedelta(seconds=1)}, SampleRequestExpiredError, "expired"),
    ({"expires": NOW + timedelta(days=30)}, SampleRequestExpiredError, "samples.max_ttl_s"),
])
def test_request_for_elsewhere_or_stale_is_refused(
        signer: CryptoSigner, change: dict[str, Any], error: type[Exception],
        words: str) -> None:
    req = replace(S.request(DEV, now=NOW), **change)
    with pytest.raises(error, match=words):
        verify(S.signed(req, signer), signer)


def test_request_signed_by_a_foreign_key_is_refused(signer: CryptoSigner) -> None:
    other = CryptoSigner.generate_ed25519()
    with pytest.raises(SampleSignatureError, match="not signed by the trusted"):
        verify(S.signed(S.request(DEV, now=NOW), other), signer)


def test_request_over_the_devices_limits_is_refused(signer: CryptoSigner) -> None:
    from edge_sdk.samples import SampleLimits

    payload = S.signed(S.request(DEV, now=NOW, count=50), signer)
    with pytest.raises(SampleRequestTooLargeError, match=r"samples\.max_count"):
        verify(payload, signer, limits=SampleLimits(max_count=10))
    with pytest.raises(SampleRequestTooLargeError, match=r"samples\.max_request_bytes"):
        verify(payload, signer, limits=SampleLimits(max_request_bytes=100))


@pytest.mark.parametrize("signed_part, words", [
    ({"rule": "everything"}, "'rule' must be one of"),
    ({"count": 0}, "'count' must be 1..1000"),
    ({"count": 1001}, "'count' must be 1..1000"),
    ({"max_bytes": 64 * 1024 * 1024 + 1}, "'max_bytes'"),
    ({"threshold": 0.5}, "cannot be canonicalised"),
    ({"threshold": "nan"}, "'threshold' must be a decimal string"),
    ({"rule": "random", "threshold": "2"}, "number of requests to draw from"),
    ({"model": "../etc"}, "'model' must be a model name"),
    ({"outputs": 1}, "'outputs' is missing or not bool"),
])
def test_malformed_request_is_refused_in_one_line(
        signer: CryptoSigner, signed_part: dict[str, Any], words: str) -> None:
    from edge_sdk.trust._envelope import canonical

    body = {**S.request(DEV, now=NOW).to_signed(), **signed_part}
    try:
        sig = signer.sign(canonical(body)).to_dict()
    except Exception:  # a float cannot be canonicalised: the envelope says so
        sig = {"keyid": signer.public_key.keyid, "sig": "00"}
    payload = json.dumps({"signed": body, "signatures": [sig]}).encode()
    with pytest.raises(SampleVerificationError, match=words) as err:
        verify(payload, signer)
    assert "\n" not in str(err.value)


def test_hostile_status_is_refused_or_cut() -> None:
    with pytest.raises(MalformedSampleStatusError):
        SampleStatus.from_bytes(b"x" * 10_000)
    with pytest.raises(MalformedSampleStatusError, match="'state'"):
        SampleStatus.from_bytes(json.dumps({"id": "ab" * 16, "state": "done"}).encode())
    with pytest.raises(MalformedSampleStatusError, match="'count'"):
        SampleStatus.from_bytes(json.dumps({"id": "ab" * 16, "state": "ready",
                                            "count": -1}).encode())
    st = SampleStatus.from_bytes(json.dumps({"id": "ab" * 16, "state": "refused",
                                             "reason": "a\nb " * 500}).encode())
    assert len(st.reason) <= 300 and "\n" not in st.reason


# -- the rules' scores (pure) ---------------------------------------------------------

def test_classify_confidence_is_the_top_softmax_score(tmp_path: Path) -> None:
    m = S.classifier(tmp_path).manifest
    logits = np.array([[0.0, 0, 0, 0], [10.0, 0, 0, 0]])
    np.testing.assert_allclose(confidence(m, {"probs": logits}, 2),
                               [0.25, np.exp(10) / (np.exp(10) + 3)])
    probs = np.array([[0.1, 0.9, 0, 0]])
    np.testing.assert_allclose(confidence(m, {"probs": probs}, 1), [0.9])


def test_detect_confidence_is_the_best_box_per_image(tmp_path: Path) -> None:
    m = replace(S.classifier(tmp_path).manifest, task="detect")
    out = {"scores": np.array([0.3, 0.8, 0.6]), "batch_index": np.array([0, 0, 2]),
           "boxes": np.zeros((3, 4))}
    np.testing.assert_allclose(confidence(m, out, 3), [0.8, 0.0, 0.6])


def test_raw_detect_head_confidence_is_its_best_class_score(tmp_path: Path) -> None:
    m = replace(S.classifier(tmp_path).manifest, task="detect",
                outputs=(edge_sdk.TensorSpec("out", "float32", ("batch", 6, 3)),),
                extra={"task_outputs": {"out": {"kind": "detect-yolov8"}}})
    head = np.zeros((2, 6, 3))  # [batch, 4 box + 2 classes, 3 anchors]
    head[0, 4:, :] = [[0.1, 0.7, 0.2], [0.3, 0.1, 0.05]]
    head[1, 4:, :] = [[0.05, 0.1, 0.2], [0.15, 0.1, 0.1]]
    np.testing.assert_allclose(confidence(m, {"out": head}, 2), [0.7, 0.2])


def test_drift_distance_is_the_largest_channel_z_score() -> None:
    feed = {"x": np.array([[0.0, 0, 0, 0], [0.0, 5.0, 0, 0], [-2.0, 0, 0, 0]], np.float32)}
    np.testing.assert_allclose(drift_distance(S.INPUT_STATS, feed, 3), [0.0, 5.0, 2.0])


# -- the collector, fed directly ------------------------------------------------------

class Rig:
    """A collector on a state dir with a real served model; what it publishes is kept."""

    def __init__(self, tmp: Path, signer: CryptoSigner, **samples: Any) -> None:
        art = S.classifier(tmp)
        rec = ModelRecord("cls-1", "cls", "1", art.manifest.sha256)
        self.model = Served(edge_sdk.load(art.path), rec)
        limits = samples.pop("limits", {})
        self.config = AgentConfig.from_dict({
            "device_id": DEV, "fleet": "lab", "state_dir": str(tmp / "state"),
            "samples": samples, "limits": limits})
        (tmp / "state").mkdir(exist_ok=True)
        self.signer = signer
        self.topics = Topics("lab")
        self.sent: list[tuple[str, bytes, bool]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.stop_ev = threading.Event()
        self.c = self.new()

    def new(self) -> SampleCollector:
        c = SampleCollector(
            self.config, self.config.state_dir, self.topics,
            lambda t, p, r: self.sent.append((t, p, r)),
            lambda kind, **f: self.events.append((kind, f)),
            key=lambda: self.signer.public_key,
            served=lambda name: self.model if name == "cls" else None, stop=self.stop_ev)
        c.start()
        return c

    def restart(self) -> None:
        self.stop_ev.set()
        self.c.stop()
        self.stop_ev = threading.Event()
        self.c = self.new()

    def ask(self, **kw: Any) -> str:
        req = S.request(DEV, **kw)
        self.c.on_request("", S.signed(req, self.signer))
        wait_for(lambda: self.status(req.id) is not None, 10)
        return req.id

    def statuses(self, rid: str) -> list[SampleStatus]:
        topic = self.topics.samples_status(DEV)
        return [s for s in (SampleStatus.from_bytes(p) for t, p, _ in list(self.sent)
                            if t == topic) if s.id == rid]

    def status(self, rid: str) -> SampleStatus | None:
        mine = self.statuses(rid)
        return mine[-1] if mine else None

    def wait_final(self, rid: str) -> SampleStatus:
        def final() -> SampleStatus | None:
            st = self.status(rid)
            return st if st is not None and st.state != "collecting" else None

        st: SampleStatus = wait_for(final, 20, lambda: S.describe(self.statuses(rid)))
        return st

    def bundle(self, rid: str) -> dict[str, np.ndarray]:
        with np.load(self.config.state_dir / "samples" / rid / "bundle.npz") as z:
            return {k: z[k] for k in z.files}

    def serve(self, x: np.ndarray) -> None:
        self.c.served(self.model, {"x": x}, self.model.run({"x": x}), 0.001)

    def close(self) -> None:
        self.stop_ev.set()
        self.c.stop()


@pytest.fixture
def rig(tmp_path: Path, signer: CryptoSigner) -> Iterator[Rig]:
    r = Rig(tmp_path, signer)
    yield r
    r.close()


def _drain(rig: Rig) -> None:
    # The collector's queue is bounded: hand rows one at a time, as a slow request rate.
    wait_for(lambda: rig.c.queued == 0, 10)


def test_offered_disagreements_are_kept_and_nothing_else(rig: Rig) -> None:
    rid = rig.ask(rule="disagreement", count=3, outputs=True)
    rig.serve(S.row(0.0, 0.01))  # the tap: a disagreement rule keeps nothing it serves
    x = np.concatenate([S.row(1.0, 0.1), S.row(2.0, 0.2)])
    rig.c.offer("cls", {"x": x}, {"probs": rig.model.run({"x": x})["probs"]}, score=0.4)
    rig.c.offer("cls", {"x": S.row(3.0)}, {"probs": np.ones((1, 4))}, tag="drift")
    rig.c.offer("other", {"x": S.row(4.0)}, {"probs": np.ones((1, 4))})
    rig.c.offer("cls", {"x": S.row(5.0, 0.5)}, {"probs": np.ones((1, 4))}, score=0.1)
    st = rig.wait_final(rid)
    assert (st.state, st.count) == ("ready", 3)
    b = rig.bundle(rid)
    np.testing.assert_array_equal(b["x"][:, 0], [1.0, 2.0, 5.0])
    np.testing.assert_allclose(b["scores"], [0.4, 0.4, 0.1])
    assert b["out.probs"].shape == (3, 4) and str(b["rule"]) == "disagreement"


def test_nothing_is_stored_without_a_request(rig: Rig) -> None:
    rig.serve(S.row(0.0))
    rig.c.offer("cls", {"x": S.row(0.0)}, {"probs": np.ones((1, 4))})
    assert not list((rig.config.state_dir / "samples").glob("*/*.npz"))


def test_low_confidence_keeps_exactly_the_rows_below_threshold(rig: Rig) -> None:
    rid = rig.ask(rule="low_confidence", count=3, threshold=0.5)
    batch = np.concatenate([S.row(10.0, 0.1), S.row(0.0, 0.2), S.row(8.0, 0.3)])
    rig.serve(batch)
    for k in range(4):
        _drain(rig)
        rig.serve(S.row(5.0 if k % 2 else 0.0, 0.4 + 0.1 * k))
    st = rig.wait_final(rid)
    assert (st.state, st.count) == ("ready", 3)
    tags = rig.bundle(rid)["x"][:, 1]
    np.testing.assert_allclose(tags, [0.2, 0.4, 0.6], rtol=1e-6)
    assert np.all(rig.bundle(rid)["scores"] < 0.5)


def test_random_rule_draws_count_rows_from_the_window(rig: Rig) -> None:
    rid = rig.ask(rule="random", count=3, threshold=8)
    for k in range(8):
        _drain(rig)
        rig.serve(S.row(0.0, float(k)))
    st = rig.wait_final(rid)
    assert (st.state, st.count) == ("ready", 3)
    tags = rig.bundle(rid)["x"][:, 1]
    assert len(set(tags.tolist())) == 3 and set(tags.tolist()) <= set(range(8))


def test_drift_rule_keeps_rows_far_from_the_reference(rig: Rig) -> None:
    rid = rig.ask(rule="drift", count=2, threshold=3.0)
    for s in (0.5, 4.0, -1.0, -6.0):
        _drain(rig)
        rig.serve(S.row(s))
    st = rig.wait_final(rid)
    assert (st.state, st.count) == ("ready", 2)
    np.testing.assert_allclose(rig.bundle(rid)["x"][:, 0], [4.0, -6.0])


def test_bundle_stays_within_the_requests_max_bytes(rig: Rig) -> None:
    rid = rig.ask(rule="disagreement", count=50, max_bytes=2500)
    for k in range(10):
        _drain(rig)
        rig.c.offer("cls", {"x": S.row(float(k))}, {"probs": np.ones((1, 4))})
    st = rig.wait_final(rid)
    assert st.state == "ready" and 0 < st.count < 10
    assert st.size <= 2500
    assert (rig.config.state_dir / "samples" / rid / "bundle.npz").stat().st_size == st.size
    assert "max_bytes" in st.reason


def test_disk_reserve_is_never_spent(tmp_path: Path, signer: CryptoSigner) -> None:
    rig = Rig(tmp_path, signer, limits={"reserve_bytes": 1 << 62})
    try:
        rid = rig.ask(rule="disagreement", count=2)
        rig.c.offer("cls", {"x": S.row(1.0)}, {"probs": np.ones((1, 4))})

        def skipped() -> SampleStatus | None:
            st = rig.status(rid)
            return st if st is not None and "disk reserve" in st.reason else None

        st = wait_for(skipped, 10, lambda: S.describe(rig.statuses(rid)))
        assert st.count == 0
        assert not list((rig.config.state_dir / "samples").glob("*/s*.npz"))
    finally:
        rig.close()


def test_buffer_count_limit_drops_the_oldest(tmp_path: Path, signer: CryptoSigner) -> None:
    rig = Rig(tmp_path, signer, max_buffer_count=2)
    try:
        rid = rig.ask(rule="disagreement", count=5, ttl=timedelta(seconds=3))
        for k in range(4):
            _drain(rig)
            rig.c.offer("cls", {"x": S.row(float(k))}, {"probs": np.ones((1, 4))})
        st = rig.wait_final(rid)
        assert (st.state, st.count) == ("ready", 2)
        np.testing.assert_array_equal(rig.bundle(rid)["x"][:, 0], [2.0, 3.0])
    finally:
        rig.close()


def test_restart_mid_collection_keeps_the_buffer(rig: Rig) -> None:
    rid = rig.ask(rule="disagreement", count=3)
    for k in range(2):
        _drain(rig)
        rig.c.offer("cls", {"x": S.row(float(k))}, {"probs": np.ones((1, 4))})
    wait_for(lambda: (rig.status(rid) or SampleStatus(rid, "collecting")).count == 2, 10)
    rig.restart()
    assert any(kind == "samples_resumed" and f["count"] == 2 for kind, f in rig.events)
    rig.c.offer("cls", {"x": S.row(7.0)}, {"probs": np.ones((1, 4))})
    st = rig.wait_final(rid)
    assert (st.state, st.count) == ("ready", 3)
    np.testing.assert_array_equal(rig.bundle(rid)["x"][:, 0], [0.0, 1.0, 7.0])


def test_restart_keeps_refusing_a_replayed_request(rig: Rig) -> None:
    first = S.request(DEV, rule="disagreement", count=1)
    payload = S.signed(first, rig.signer)
    rig.c.on_request("", payload)
    wait_for(lambda: rig.status(first.id) is not None, 10)
    rig.ask(rule="disagreement", count=1)  # replaces it
    rig.restart()
    rig.c.on_request("", payload)
    st = rig.wait_final(first.id)
    assert st.state == "refused" and "replayed" in st.reason


def test_the_retained_copy_again_gets_its_status_not_a_refusal(rig: Rig) -> None:
    req = S.request(DEV, rule="disagreement", count=1)
    payload = S.signed(req, rig.signer)
    rig.c.on_request("", payload)
    wait_for(lambda: rig.status(req.id) is not None, 10)
    rig.c.on_request("", payload)  # the broker delivers the retained request again
    wait_for(lambda: len(rig.statuses(req.id)) >= 2, 10)
    assert [s.state for s in rig.statuses(req.id)] == ["collecting", "collecting"]


def test_local_veto_refuses_every_request(tmp_path: Path, signer: CryptoSigner) -> None:
    rig = Rig(tmp_path, signer, enabled=False)
    try:
        req = S.request(DEV)
        rig.c.on_request("", S.signed(req, signer))
        st = wait_for(lambda: rig.status(req.id), 10)
        assert st.state == "refused" and "samples.enabled" in st.reason
    finally:
        rig.close()


def test_oversized_request_is_refused_by_size_without_being_read(rig: Rig) -> None:
    req = S.request(DEV)
    payload = S.signed(req, rig.signer) + b" " * 10_000
    rig.c.on_request("", payload)
    st = wait_for(lambda: rig.status(req.id), 10)
    assert st.state == "refused" and "samples.max_request_bytes" in st.reason


def test_request_for_a_model_not_served_is_refused(rig: Rig) -> None:
    req = S.request(DEV, model="nope")
    rig.c.on_request("", S.signed(req, rig.signer))
    st = wait_for(lambda: rig.status(req.id), 10)
    assert st.state == "refused" and "serves no model nope" in st.reason


def test_calibration_file_has_only_the_inputs(tmp_path: Path) -> None:
    from edge_sdk._io import npz_bytes

    bundle = npz_bytes({"x": np.zeros((2, 4), np.float32), "out.probs": np.ones((2, 4)),
                        "rule": np.array("random"), "scores": np.zeros(2)})
    got = write_calibration(bundle, tmp_path / "cal.npz", what="bundle")
    with np.load(got.path) as z:
        assert z.files == ["x"]
    assert got.extra is not None and got.count == 2
