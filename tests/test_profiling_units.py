"""The profiling request document (signed by the deployment key, never a deployment), the
device's result document, the agent's admission queue and its measuring child."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner

from device_agent._profile_child import compare
from device_agent._profiler import Admission, run_child
from edge_sdk.profiling import (
    FileRef,
    MalformedProfilingRequestError,
    MalformedProfilingResultError,
    ProfileCandidate,
    ProfilingLimits,
    ProfilingNotForThisDeviceError,
    ProfilingRequest,
    ProfilingRequestExpiredError,
    ProfilingRequestTooLargeError,
    ProfilingResult,
    ProfilingSignatureError,
    parse_profiling_result,
    sign_profiling_request,
    verify_profiling_request,
)
from edge_sdk.trust import DeploymentVerificationError, verify_deployment
from tests import _models

RID = "ab" * 16
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def ref(name: str, n: int = 100) -> FileRef:
    return FileRef(f"profiling/{RID}/{name}", "0" * 64, n)


def request(**kw: object) -> ProfilingRequest:
    base = ProfilingRequest(
        fleet="lab", device="dev-1", id=RID, issued=NOW, expires=NOW + timedelta(minutes=10),
        sample=ref("sample.npz"),
        candidates=(ProfileCandidate("fp32", ref("fp32.onnx"), ref("fp32.expected.npz")),))
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def verify(payload: bytes, signer: CryptoSigner, **kw: object) -> ProfilingRequest:
    args: dict[str, object] = {"device_id": "dev-1", "fleet": "lab", "now": NOW, **kw}
    return verify_profiling_request(payload, signer.public_key, **args)  # type: ignore[arg-type]


def test_signed_request_verifies_and_says_what_was_signed(signer) -> None:
    req = verify(sign_profiling_request(request(rtol=0.05), [signer]), signer)
    assert req.id == RID and req.candidates[0].name == "fp32" and req.rtol == 0.05
    assert req.keyid == signer.public_key.keyid and req.sample.target.endswith("sample.npz")


def test_a_candidate_spread_travels_signed_and_a_hostile_one_is_refused(signer) -> None:
    """A quantized candidate's spread (how far correct runtimes differ on it) is signed with
    the request; a request without it verifies as before (old hosts)."""
    cands = (ProfileCandidate("fp32", ref("fp32.onnx"), ref("fp32.npz")),
             ProfileCandidate("int8", ref("int8.onnx"), ref("int8.npz"), spread=0.0625))
    req = verify(sign_profiling_request(request(candidates=cands), [signer]), signer)
    assert [c.spread for c in req.candidates] == [None, 0.0625]
    for bad in ("-1", "nan", "1e9", 3):
        signed = request(candidates=cands).to_signed()
        signed["candidates"][1]["spread"] = bad
        with pytest.raises(MalformedProfilingRequestError, match=r"candidates\[1\]\.spread"):
            ProfilingRequest.from_signed(signed)


def test_unsigned_and_foreign_signed_requests_are_refused(signer) -> None:
    doc = json.loads(sign_profiling_request(request(), [signer]))
    doc["signatures"] = []
    with pytest.raises(ProfilingSignatureError, match="not signed by the trusted"):
        verify(json.dumps(doc).encode(), signer)
    other = CryptoSigner.generate_ed25519()
    with pytest.raises(ProfilingSignatureError):
        verify(sign_profiling_request(request(), [other]), signer)


def test_tampered_request_is_refused(signer) -> None:
    doc = json.loads(sign_profiling_request(request(), [signer]))
    doc["signed"]["candidates"][0]["model"]["sha256"] = "1" * 64
    with pytest.raises(ProfilingSignatureError):
        verify(json.dumps(doc).encode(), signer)


def test_a_deployment_is_not_a_profiling_request_and_vice_versa(signer) -> None:
    doc = json.loads(sign_profiling_request(request(), [signer]))
    with pytest.raises(DeploymentVerificationError):
        verify_deployment(json.dumps(doc).encode(), signer.public_key, device_id="dev-1")
    # Re-typed and re-signed as a deployment: still not a profiling request.
    doc["signed"]["type"] = "edge-deployment"
    from edge_sdk.trust._envelope import canonical

    doc["signatures"] = [signer.sign(canonical(doc["signed"])).to_dict()]
    with pytest.raises(MalformedProfilingRequestError, match=r"signed\.type"):
        verify(json.dumps(doc).encode(), signer)


def test_expired_and_overlong_requests_are_refused(signer) -> None:
    old = sign_profiling_request(request(expires=NOW - timedelta(seconds=1)), [signer])
    with pytest.raises(ProfilingRequestExpiredError, match="expired"):
        verify(old, signer)
    far = sign_profiling_request(request(expires=NOW + timedelta(days=30)), [signer])
    with pytest.raises(ProfilingRequestExpiredError, match="max_ttl_s"):
        verify(far, signer)


def test_request_for_another_device_is_refused(signer) -> None:
    with pytest.raises(ProfilingNotForThisDeviceError, match="dev-2"):
        verify(sign_profiling_request(request(device="dev-2"), [signer]), signer)


def test_oversized_requests_are_refused_naming_the_limit(signer) -> None:
    many = tuple(ProfileCandidate(f"c{i}", ref(f"c{i}.onnx"), ref(f"c{i}.npz"))
                 for i in range(5))
    with pytest.raises(ProfilingRequestTooLargeError, match="max_candidates"):
        verify(sign_profiling_request(request(candidates=many), [signer]), signer,
               limits=ProfilingLimits(max_candidates=4))
    big = (ProfileCandidate("big", ref("big.onnx", 10**9), ref("big.npz")),)
    with pytest.raises(ProfilingRequestTooLargeError, match="max_candidate_bytes"):
        verify(sign_profiling_request(request(candidates=big), [signer]), signer)
    with pytest.raises(ProfilingRequestTooLargeError, match="max_request_bytes"):
        verify(b"{" + b" " * 40000 + b"}", signer)


def test_malformed_fields_are_refused_before_use(signer) -> None:
    bad_path = (ProfileCandidate("x", FileRef("models/x.onnx", "0" * 64, 1), ref("x.npz")),)
    with pytest.raises(MalformedProfilingRequestError, match="under profiling/"):
        verify(sign_profiling_request(request(candidates=bad_path), [signer]), signer)
    with pytest.raises(MalformedProfilingRequestError, match="rtol"):
        verify(sign_profiling_request(request(rtol=2.0), [signer]), signer)
    with pytest.raises(MalformedProfilingRequestError, match="rounds"):
        verify(sign_profiling_request(request(rounds=0), [signer]), signer)
    with pytest.raises(MalformedProfilingRequestError):
        verify(b"[" * 5000, signer)


def test_refusals_name_the_profiling_request_never_a_deployment(signer) -> None:
    # One envelope for both kinds: each refusal names the document it refuses.
    doc = json.loads(sign_profiling_request(request(), [signer]))
    doc["signed"]["issued"] = "yesterday"
    from edge_sdk.trust._envelope import canonical

    doc["signatures"] = [signer.sign(canonical(doc["signed"])).to_dict()]
    for payload in (json.dumps(doc).encode(), b"[" * 5000, b"[]",
                    b'{"signed":{},"signatures":[{"keyid":1}]}'):
        with pytest.raises(MalformedProfilingRequestError,
                           match=r"^profiling request\b") as info:
            verify(payload, signer)
        assert "deployment" not in str(info.value)


def test_result_round_trips_and_hostile_results_are_refused() -> None:
    from edge_sdk.profiling import CandidateTiming

    res = ProfilingResult(RID, "dev-1", "done", hardware={"arch": "aarch64"}, threads=2,
                          candidates=(CandidateTiming("fp32", median_ms=1.5, p90_ms=2.0),))
    back = parse_profiling_result(res.dumps())
    assert back.timing("fp32") is not None and back.timing("fp32").median_ms == 1.5
    assert back.threads == 2 and back.hardware["arch"] == "aarch64"
    doc = res.to_json()
    doc["candidates"][0]["median_ms"] = -1
    assert parse_profiling_result(json.dumps(doc).encode()).timing("fp32").ok is False
    for payload in (b"[" * 100, b'{"type": "edge-deployment"}', b"x" * 70000,
                    json.dumps({**res.to_json(), "status": "maybe"}).encode()):
        with pytest.raises(MalformedProfilingResultError):
            parse_profiling_result(payload)


def test_admission_runs_one_queues_a_few_and_refuses_replays_and_overflow() -> None:
    a = Admission(max_queued=1)
    t = NOW.timestamp()
    assert a.admit("1" * 16, expires=t + 60, now=t) is None and a.start() == "1" * 16
    assert a.admit("2" * 16, expires=t + 60, now=t) is None
    assert "busy" in str(a.admit("3" * 16, expires=t + 60, now=t))
    assert "replayed" in str(a.admit("1" * 16, expires=t + 60, now=t))
    a.finish()
    assert a.start() == "2" * 16 and a.start() is None


def test_seen_ids_are_kept_until_they_expire_and_an_id_dropped_over_the_bound_stays_refused(
        ) -> None:
    t = NOW.timestamp()
    a = Admission(max_queued=10, seen_max=2)
    for i, ttl in enumerate((300, 100, 200)):
        assert a.admit(f"{i}" * 16, expires=t + ttl, now=t) is None
    # Three unexpired ids, room for two: the one expiring first goes, and the floor rises
    # to its expiry, so its replay (and any request expiring as early) is still refused.
    assert sorted(a.seen.ids) == ["0" * 16, "2" * 16] and a.seen.floor == int(t + 100)
    assert not a.replayed("1" * 16)
    assert "may be a replay" in str(a.admit("1" * 16, expires=t + 100, now=t + 1))
    assert "profiling.max_seen" in str(a.admit("9" * 16, expires=t + 50, now=t + 1))
    # Past their expiry ids and floor are forgotten: such a request is refused as expired.
    assert a.admit("4" * 16, expires=t + 900, now=t + 250) is None
    assert sorted(a.seen.ids) == ["0" * 16, "4" * 16] and a.seen.floor == 0
    before = a.seen
    assert a.admit("5" * 16, expires=t + 900, now=t + 250) is None
    a.withdraw("5" * 16, before)
    assert a.seen == before and "5" * 16 not in a.waiting


class RefusingSource:
    """The agent's release source interface (``key``, ``fetch_file``, ``drop_partial``)
    over a repository that has none of the requested files."""

    def __init__(self, key: object) -> None:
        self.key = key

    def fetch_file(self, target: str, dest: Path, *, sha256: str, length: int) -> Path:
        from edge_sdk.trust import TargetMismatchError

        raise TargetMismatchError(f"{target} is not a signed target")

    def drop_partial(self, sha256s: object) -> None:
        pass


class ProfilerRig:
    """A real :class:`Profiler` on ``state``; ``ask`` hands it a payload and returns the
    reply, or None when the events say it was ignored as a replay."""

    def __init__(self, state: Path, signer: CryptoSigner, **profiling: object) -> None:
        import threading

        from device_agent._config import AgentConfig
        from device_agent._profiler import Profiler

        cfg = AgentConfig.from_dict({"device_id": "dev-1", "fleet": "lab",
                                     "state_dir": str(state), "profiling": profiling})
        self.sent: list[bytes] = []
        self.events: list[tuple[str, dict[str, object]]] = []
        self.stop = threading.Event()
        self.prof = Profiler(cfg, state, lambda t, p: self.sent.append(p),
                             lambda kind, **f: self.events.append((kind, f)), dict, "res",
                             self.stop, source=RefusingSource(signer.public_key))

    def ask(self, payload: bytes) -> ProfilingResult | None:
        sent, events = len(self.sent), len(self.events)
        self.prof.on_request("req", payload)
        for _ in range(3000):
            if len(self.sent) > sent:
                return parse_profiling_result(self.sent[-1])
            if any(k == "profiling_replayed" for k, _ in self.events[events:]):
                return None
            self.stop.wait(0.01)
        raise AssertionError(f"no answer; events {self.events[events:]}")

    def close(self) -> None:
        self.stop.set()
        self.prof.stop()


def live_request(signer: CryptoSigner, ttl_s: float = 600) -> tuple[str, bytes]:
    now = datetime.now(UTC).replace(microsecond=0)
    rid = os.urandom(16).hex()
    doc = request(id=rid, issued=now, expires=now + timedelta(seconds=ttl_s))
    return rid, sign_profiling_request(doc, [signer])


def test_a_request_replayed_after_an_agent_restart_is_refused(tmp_path, signer) -> None:
    from device_agent._state import SEEN_FILE

    rid, payload = live_request(signer)
    first = ProfilerRig(tmp_path, signer)
    try:
        res = first.ask(payload)
        assert res is not None and res.id == rid and res.status == "failed"
    finally:
        first.close()
    assert rid in json.loads((tmp_path / SEEN_FILE).read_text())["ids"]
    again = ProfilerRig(tmp_path, signer)  # the same state directory: a restarted agent
    try:
        assert again.ask(payload) is None
        assert [k for k, _ in again.events] == ["profiling_replayed"]
        other_rid, other = live_request(signer)
        res = again.ask(other)
        assert res is not None and res.id == other_rid and res.status == "failed"
    finally:
        again.close()


def test_a_corrupt_seen_record_refuses_every_request_that_could_be_a_replay_and_the_agent_runs(
        tmp_path, signer) -> None:
    from device_agent._state import SEEN_FILE, read_seen, seen_max_bytes

    (tmp_path / SEEN_FILE).parent.mkdir()
    for garbage in (b"{not json", b'{"schema":1,"floor":0,"ids":{"x":1}}',
                    b"[" * 10, b" " * (seen_max_bytes(512) + 1)):
        (tmp_path / SEEN_FILE).write_bytes(garbage)
        t0 = datetime.now(UTC).timestamp()
        rig = ProfilerRig(tmp_path, signer, max_ttl_s=900)
        try:
            _, payload = live_request(signer, ttl_s=600)
            res = rig.ask(payload)
            assert res is not None and res.status == "refused" and res.verified
            assert "may be a replay" in str(res.reason)
        finally:
            rig.close()
        # The floor is on disk: a second restart refuses the same requests.
        floor = json.loads((tmp_path / SEEN_FILE).read_text())["floor"]
        assert t0 + 900 <= floor <= datetime.now(UTC).timestamp() + 901
        rec, lost = read_seen(tmp_path, max_seen=512, max_ttl_s=900, now=t0)
        assert lost is None and rec.floor == floor


def test_the_seen_record_is_bounded_in_bytes_and_an_unwritable_one_refuses_the_request(
        tmp_path, signer) -> None:
    from device_agent._state import SEEN_FILE, SeenRecord, seen_max_bytes, write_seen

    far = 253402300799
    full = SeenRecord({f"{i:064x}": far for i in range(64)}, far)
    write_seen(tmp_path, full)
    assert len((tmp_path / SEEN_FILE).read_bytes()) <= seen_max_bytes(64)
    assert SeenRecord.from_bytes((tmp_path / SEEN_FILE).read_bytes(), max_seen=64,
                                 where="x") == full
    (tmp_path / SEEN_FILE).unlink()
    rig = ProfilerRig(tmp_path, signer)
    try:
        # The state directory fails after the agent started (a full or broken disk; as
        # root no permission bit stops a write, so the directory becomes a file).
        (tmp_path / SEEN_FILE).parent.rmdir()
        (tmp_path / SEEN_FILE.parent).write_text("not a directory")
        rid, payload = live_request(signer)
        res = rig.ask(payload)
        assert res is not None and res.id == rid and res.status == "refused"
        assert "cannot record request" in str(res.reason)
        assert [k for k, _ in rig.events] == ["profiling_refused"]  # nothing ran
    finally:
        rig.close()


def test_outputs_compare_within_tolerance_and_exactly_for_integers() -> None:
    want = {"y": np.array([1.0, 2.0], np.float32), "k": np.array([3], np.int64)}
    assert compare({"y": want["y"] + 0.001, "k": want["k"]}, want, 1e-2, 0)[1] is None
    assert "differs" in str(compare({"y": want["y"] + 1, "k": want["k"]}, want, 1e-2, 0)[1])
    assert "exact" in str(compare({"y": want["y"], "k": want["k"] + 1}, want, 1e-2, 0)[1])
    assert "shape" in str(compare({"y": want["y"][:1], "k": want["k"]}, want, 1e-2, 0)[1])


def test_the_same_nan_and_inf_as_the_host_match_and_others_do_not() -> None:
    inf, nan = np.inf, np.nan
    want = {"y": np.array([1.0, -inf, nan, 2.0], np.float32)}
    assert compare({"y": np.array([1.001, -inf, nan, 2.0], np.float32)}, want, 1e-2, 0) \
        == (pytest.approx(0.001, rel=1e-3), None)
    for got in ([1.0, inf, nan, 2.0], [1.0, -inf, 0.0, 2.0], [nan, -inf, nan, 2.0],
                [1.0, nan, nan, 2.0]):
        assert "NaN/inf" in str(compare({"y": np.array(got, np.float32)}, want, 1e-2, 0)[1])
    allnan = {"y": np.array([nan, nan])}
    assert compare(allnan, allnan, 1e-2, 0) == (0.0, None)


def test_child_measures_a_model_and_a_hanging_child_is_killed(tmp_path: Path) -> None:
    model = _models.offset_model(tmp_path / "m.onnx", 1.0)
    x = np.array([[1, 2, 3, 4]], np.float32)
    np.savez(tmp_path / "s.npz", x=x)
    np.savez(tmp_path / "e.npz", y=x + 1)
    spec = json.dumps({"model": str(model), "sample": str(tmp_path / "s.npz"),
                       "expected": str(tmp_path / "e.npz"), "threads": 1, "runs": 5, "rounds": 2,
                       "warmup": 1, "rtol": 0.01, "atol": 0.0})
    out, rss, why = run_child([sys.executable, "-m", "device_agent._profile_child", spec],
                              timeout_s=60, nice=19, max_memory=0,
                              stderr_path=tmp_path / "err")
    assert why is None and out["runs"] == 5 and out["median_ms"] > 0 and "error" not in out
    assert len(out["round_medians_ms"]) == 2
    assert rss is not None and rss > 10 * 2**20
    out, _, why = run_child([sys.executable, "-c", "import time; time.sleep(60)"],
                            timeout_s=0.5, nice=19, max_memory=0,
                            stderr_path=tmp_path / "err2")
    assert out == {} and "timed out" in str(why)


def test_profiling_config_is_checked_naming_the_key(tmp_path: Path) -> None:
    from device_agent._config import AgentConfig
    from edge_sdk.errors import ConfigError

    base = {"device_id": "d", "fleet": "lab", "state_dir": str(tmp_path)}
    cfg = AgentConfig.from_dict({**base, "profiling": {"threads": 2, "max_queued": 0}})
    assert cfg.profiling.threads == 2 and cfg.profiling.max_queued == 0
    with pytest.raises(ConfigError, match=r"profiling\.nice"):
        AgentConfig.from_dict({**base, "profiling": {"nice": 40}})
    with pytest.raises(ConfigError, match=r"profiling\.timeout_s"):
        AgentConfig.from_dict({**base, "profiling": {"timeout_s": 0}})
    with pytest.raises(ConfigError, match="unknown key"):
        AgentConfig.from_dict({**base, "profiling": {"thread": 2}})


class FigureProfiler:
    """A device profiler (the interface ``convert --profile-on`` injects) whose devices
    answer with the figures the test gives: device → candidate → median ms or an error."""

    def __init__(self, figures: dict[str, dict[str, float | str | None]]) -> None:
        self.figures = figures
        self.calls: list[list[str]] = []

    def __call__(self, candidates, sample, expected, *, spread=None):  # type: ignore[no-untyped-def]
        from edge_sdk.profiling import CandidateTiming

        names = [n for n, _ in candidates]
        self.calls.append(names)
        assert set(expected) == set(names) and all(expected[n] for n in names)
        self.spread = spread
        out = {}
        for dev, figs in self.figures.items():
            rows = []
            for n in names:
                f = figs.get(n, 1.0)
                rows.append(CandidateTiming(n, error=f) if isinstance(f, str) else
                            CandidateTiming(n, load_ms=1.0) if f is None else  # no figures
                            CandidateTiming(n, load_ms=1.0, median_ms=f, p90_ms=f * 1.1,
                                            runs=10))
            out[dev] = ProfilingResult(RID, dev, "done", hardware={"arch": dev},
                                       threads=1, candidates=tuple(rows))
        return out


def _convert_with(tmp_path: Path, profiler: FigureProfiler) -> dict:  # type: ignore[type-arg]
    from converters import ConvertConfig, convert
    from converters._measure import MeasureConfig
    from tests import _convert_models

    src = _convert_models.mlp_classifier(tmp_path / "mlp.onnx", features=16, hidden=32)
    cfg = ConvertConfig(measure=MeasureConfig(rounds=2, runs_per_round=3, warmup=1),
                        device_profiler=profiler)
    res = convert(src, tmp_path / "art", quantize="auto", prefer="latency", config=cfg)
    return dict(res.report)


def test_the_worst_device_decides_and_a_mismatch_on_a_device_excludes(tmp_path) -> None:
    prof = FigureProfiler({
        "arm-a": {"fp32": 1.0, "fp16": 0.9, "int8-dynamic": 0.2, "int8-dynamic-pc": 0.3},
        "arm-b": {"fp32": 1.0, "fp16": 0.5, "int8-dynamic": 3.0,
                  "int8-dynamic-pc": "output 'logits' differs from the host's by 1"},
    })
    report = _convert_with(tmp_path, prof)
    assert prof.calls and "fp32" in prof.calls[0]
    rows = {r["name"]: r for r in report["candidates"]}
    # int8-dynamic is 5x faster on arm-a but 3x slower on arm-b: the worst device decides.
    assert rows["int8-dynamic"]["device_latency_ms"] == 3.0
    assert report["chosen"] == "fp16" and rows["fp16"]["device_latency_ms"] == 0.9
    assert "worst device's latency decides" in report["rule"]
    assert rows["int8-dynamic-pc"]["status"] == "excluded"
    assert rows["int8-dynamic-pc"]["device_latency_ms"] is None
    assert "on device arm-b: output 'logits' differs" in rows["int8-dynamic-pc"]["note"]
    assert any("int8-dynamic-pc: on device arm-b: output 'logits' differs" in w
               for w in report["warnings"])
    assert set(report["devices"]) == {"arm-a", "arm-b"}
    assert rows["fp32"]["devices"]["arm-b"]["median_ms"] == 1.0
    # Each candidate goes with its distance from the float model on the sample: how far
    # another ISA's correct arithmetic may take it (x86 without VNNI saturates int8 sums).
    assert "fp32" not in prof.spread and prof.spread["int8-dynamic"] > 0
    assert set(prof.spread) == set(prof.calls[0]) - {"fp32"}


def test_a_device_row_without_figures_is_excluded_saying_what_is_missing(tmp_path) -> None:
    report = _convert_with(tmp_path, FigureProfiler({"arm-a": {"int8-dynamic": None}}))
    rows = {r["name"]: r for r in report["candidates"]}
    assert rows["int8-dynamic"]["status"] == "excluded"
    assert rows["int8-dynamic"]["note"] == \
        "on device arm-a: the device reported no median latency for it"
    assert rows["int8-dynamic"]["device_latency_ms"] is None
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["profiled_on"]["arm-a"]["latency_ms"] == \
        rows[report["chosen"]]["devices"]["arm-a"]["median_ms"] == 1.0


def test_profiling_files_are_verified_by_tuf_and_never_installed(tmp_path) -> None:
    from edge_sdk.release import Repository
    from edge_sdk.trust import (
        Deployment,
        ModelTarget,
        TargetHashError,
        TargetMismatchError,
        UpdateClient,
    )
    from tests._repository_simulator import RepositorySimulator

    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    model = _models.offset_model(tmp_path / "m.onnx", 1.0)
    signed = repo.add_profiling_files(RID, {"c0.onnx": model})
    tf = signed["c0.onnx"]
    assert tf.path == f"profiling/{RID}/c0.onnx" and repo.targets() == []
    sim = RepositorySimulator(repo)

    def client() -> UpdateClient:
        return UpdateClient(trusted_root=repo.root_path.read_bytes(),
                            metadata_dir=tmp_path / "md", partial_dir=tmp_path / "part",
                            fetcher=sim)

    got = client().fetch_file(tf.path, tmp_path / "got.onnx", sha256=tf.hashes["sha256"],
                              length=tf.length)
    assert got.read_bytes() == model.read_bytes()
    with pytest.raises(TargetMismatchError, match="the request says"):
        client().fetch_file(tf.path, tmp_path / "x", sha256="1" * 64, length=tf.length)
    dep = Deployment(fleet="lab", models=(ModelTarget("m", "1", tf.path, tf.hashes["sha256"],
                                                      tf.length),), counter=1, issued=NOW,
                     expires=NOW + timedelta(days=1), devices=("dev-1",))
    with pytest.raises(TargetMismatchError, match="never installed"):
        client().fetch(dep, tmp_path / "installed")
    assert not (tmp_path / "installed").exists()
    # Tampered bytes on the wire: refused by the signed hash.
    key = next(k for k in sim.files if k.endswith(".c0.onnx"))
    sim.files[key] = sim.files[key][:-1] + b"\x00"
    (tmp_path / "part").mkdir(exist_ok=True)
    for p in (tmp_path / "part").iterdir():
        p.unlink()
    with pytest.raises(TargetHashError):
        client().fetch_file(tf.path, tmp_path / "bad.onnx", sha256=tf.hashes["sha256"],
                            length=tf.length)
    assert repo.remove_profiling_files(RID) == 1
    assert not (repo.targets_dir / "profiling" / RID).exists()


def test_child_runs_at_low_priority_under_the_memory_limit(tmp_path: Path) -> None:
    probe = ("import json, os, resource; print(json.dumps({'nice': os.nice(0), "
             "'as': resource.getrlimit(resource.RLIMIT_AS)[0]}))")
    out, _, why = run_child([sys.executable, "-c", probe], timeout_s=30, nice=19,
                            max_memory=1 << 30, stderr_path=tmp_path / "err")
    assert why is None and out == {"nice": 19, "as": 1 << 30}
    hog = "b = bytearray(1 << 31)"
    out, _, why = run_child([sys.executable, "-c", hog], timeout_s=30, nice=19,
                            max_memory=1 << 30, stderr_path=tmp_path / "err2")
    assert out == {} and "out of memory under profiling.max_memory_bytes" in str(why)


def test_child_is_killed_when_the_agent_stops(tmp_path: Path) -> None:
    import threading

    stop = threading.Event()
    stop.set()
    out, _, why = run_child([sys.executable, "-c", "import time; time.sleep(60)"],
                            timeout_s=120, nice=19, max_memory=0,
                            stderr_path=tmp_path / "err", stop=stop)
    assert out == {} and "agent is stopping" in str(why)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG: Linux")
def test_child_dies_with_the_agent_even_on_kill_9(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    from tests._process import ROOT

    parent = ("import sys; from pathlib import Path; "
              "from device_agent._profiler import run_child; "
              "run_child([sys.executable, '-c', 'import sys, time; "
              "open(sys.argv[1], \"w\").close(); time.sleep(120)', sys.argv[2]], "
              "timeout_s=120, nice=19, max_memory=0, stderr_path=Path(sys.argv[1]), "
              "on_start=lambda c: print(c.pid, flush=True))")
    running = tmp_path / "running"
    agent = subprocess.Popen([sys.executable, "-c", parent, str(tmp_path / "err"),
                              str(running)],
                             cwd=ROOT, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert agent.stdout is not None
    pid = int(agent.stdout.readline())
    for _ in range(6000):  # the child is past its launcher, measuring
        if running.exists():
            break
        time.sleep(0.01)
    assert running.exists(), (tmp_path / "err").read_text()

    def alive() -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    try:
        agent.send_signal(signal.SIGKILL)
        agent.wait()

        for _ in range(3000):  # not a timing threshold: the kernel kills it at once
            if not alive():
                break
            time.sleep(0.01)
        assert not alive(), "the measuring child outlived the agent"
    finally:
        if alive():
            os.kill(pid, signal.SIGKILL)


def test_a_hostile_hardware_dict_is_reduced_to_known_facts_of_the_right_type() -> None:
    from converters._report import hardware_text
    from device_agent._agent import _hardware

    hostile = {"arch": ["x"], "cpu": "A" * 5000, "cores": "8", "cpu_features": 7,
               "runtimes": ["onnxruntime"], "threads": True, "evil": {"a": [1] * 100},
               "onnxruntime_providers": ["CPU", 3, {"x": 1}]}
    res = ProfilingResult(RID, "dev-1", "done", hardware=hostile)
    hw = parse_profiling_result(res.dumps()).hardware
    assert hw == {"cpu": "A" * 300, "onnxruntime_providers": ["CPU"]}
    text = hardware_text({"hardware": hw, "threads": 2})
    assert "unknown CPU" not in text and "features none reported" in text
    hw = parse_profiling_result(res.dumps().replace(b'"cpu_features":7',
                                                    b'"cpu_features":"sse"')).hardware
    assert "cpu_features" not in hw
    # What a real agent reports survives intact.
    real = {**_hardware(), "threads": 2}
    back = parse_profiling_result(ProfilingResult(RID, "d", "done", hardware=real).dumps())
    assert back.hardware == {k: v for k, v in real.items() if v is not None}


def test_an_oversized_request_is_refused_unverified_under_its_claimed_id(
        tmp_path: Path) -> None:
    import threading

    from device_agent._config import AgentConfig
    from device_agent._profiler import Profiler

    cfg = AgentConfig.from_dict({"device_id": "d", "fleet": "lab",
                                 "state_dir": str(tmp_path)})
    sent: list[bytes] = []
    events: list[str] = []
    stop = threading.Event()
    prof = Profiler(cfg, tmp_path, lambda t, p: sent.append(p),
                    lambda kind, **f: events.append(kind), dict, "res", stop)
    big = b'{"signed":{"id":"' + RID.encode() + b'"},"x":"' + b" " * 100_000 + b'"}'
    try:
        prof.on_request("req", big)
        for _ in range(3000):  # the intake thread answers
            if sent:
                break
            stop.wait(0.01)
    finally:
        stop.set()
        prof.stop()
    res = parse_profiling_result(sent[0])
    assert res.id == RID and res.status == "refused" and res.verified is False
    assert f"is {len(big)} bytes" in str(res.reason) and "max_request_bytes" in str(res.reason)
    assert events == ["profiling_refused"]


def test_files_signed_before_a_failure_are_removed_from_the_repository(tmp_path) -> None:
    from edge_sdk.release import Repository
    from edge_sdk.release._profile import profile_on_devices
    from edge_sdk.transport import MqttConfig, MqttConnection

    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    conn = MqttConnection(MqttConfig(url="mqtt://127.0.0.1:1", fleet="lab"))  # never used
    with pytest.raises(FileNotFoundError):  # the sample is signed, then the model is missing
        profile_on_devices(repo, conn, devices=["d"],
                           candidates=[("c", tmp_path / "missing.onnx")],
                           sample={"x": np.zeros(2)}, expected={"c": {"y": np.zeros(2)}})
    assert not [p for p in (repo.targets_dir / "profiling").rglob("*")]
    assert not [p for p in repo.load("targets").signed.targets if p.startswith("profiling/")]


def test_profiling_targets_without_a_live_owner_or_past_their_request_are_removed(
        tmp_path) -> None:
    from edge_sdk.release import Repository

    repo = Repository.init(tmp_path / "repo", tmp_path / "keys")
    model = _models.offset_model(tmp_path / "m.onnx", 1.0)
    ids = ["1" * 32, "2" * 32, "3" * 32]

    def listed() -> set[str]:
        return {p.split("/")[1] for p in repo.load("targets").signed.targets}

    # No lock at all (signed by an edge-sdk that took none): nobody owns it.
    repo.add_profiling_files(ids[0], {"c.onnx": model})
    assert listed() == {ids[0]}
    with repo.profiling_run(ids[1]) as live, repo.profiling_run(ids[2]) as stale:
        live.add_files({"c.onnx": model})  # the next change removes it
        assert listed() == {ids[1]} and repo.orphans_removed == [ids[0]]
        assert not (repo.targets_dir / "profiling" / ids[0]).exists()
        stale.add_files({"c.onnx": model})
        live.valid_until(datetime.now(UTC) + timedelta(minutes=5))
        # Held, but its request expired: no device accepts it any more.
        stale.valid_until(datetime.now(UTC) - timedelta(seconds=1))
        version = repo.versions()["targets"]
        assert repo.remove_orphaned_profiling_files() == [ids[2]]
        assert listed() == {ids[1]} and repo.versions()["targets"] == version + 1
        assert repo.remove_orphaned_profiling_files() == []
        assert repo.versions()["targets"] == version + 1  # nothing to re-sign
    assert listed() == set() and not list((repo.path / ".profiling").iterdir())


def test_a_profile_config_the_devices_would_refuse_is_a_one_line_error() -> None:
    from edge_sdk.errors import UsageError
    from edge_sdk.release import ProfileConfig

    assert ProfileConfig(timeout_s=3540).timeout_s == 3540
    with pytest.raises(UsageError, match=r"profiling.max_ttl_s\); at most 3540 s"):
        ProfileConfig(timeout_s=3600)
    for bad, key in (({"rounds": 21}, "rounds"), ({"runs": 1001}, "max_runs"),
                     ({"warmup": -1}, "warm-up"), ({"timeout_s": float("nan")}, "timeout"),
                     ({"rtol": 2.0}, "rtol")):
        with pytest.raises(UsageError, match=key):
            ProfileConfig(**bad)  # type: ignore[arg-type]
