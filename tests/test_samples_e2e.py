"""Field samples end to end: a real Mosquitto, a real agent subprocess serving a real
onnxruntime classifier, and ``edge-sdk samples allow|request|pull`` as an operator runs
them; the pulled file goes into ``edge-sdk convert --eval``."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

from edge_sdk.cli import main
from edge_sdk.release import create_deployment, publish_deployment
from edge_sdk.samples import SampleStatus
from edge_sdk.transport import ChunkRequest, ChunkResponse
from edge_sdk.trust._keys import DEPLOYMENT_ROLE
from tests import _samples as S
from tests._broker import Mosquitto
from tests._e2e import FLEET, AgentProc, Fleet
from tests._process import ROOT, edge_sdk_cli, wait_for

pytestmark = pytest.mark.slow
DEV = "samp-1"


class Rig:
    def __init__(self, fleet: Fleet, agent: SamplesAgent, tmp: Path) -> None:
        self.fleet, self.agent, self.tmp = fleet, agent, tmp
        self.status = S.StatusListener(fleet.host, fleet.topics, DEV)
        self.signer = fleet.repo.keys.signers(DEPLOYMENT_ROLE)[0]

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*args, "--broker", self.fleet.broker.url, "--fleet", FLEET])
        out, err = capsys.readouterr()
        return code, out, err

    def infer(self, x: np.ndarray) -> None:
        body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape),
                                       "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
        c = http.client.HTTPConnection("127.0.0.1", self.agent.port, timeout=10)
        try:
            c.request("POST", "/v2/models/cls/infer", body=body)
            resp = c.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
        finally:
            c.close()

    def collecting(self, rid: str, count: int) -> None:
        """Once the device said it collects ``rid`` and holds at least ``count``."""
        def kept() -> bool:
            st = self.status.last(rid)
            return st is not None and st.state == "collecting" and st.count >= count

        wait_for(kept, 30, lambda: S.describe(self.status.of(rid)))

    def final(self, rid: str) -> SampleStatus:
        st: SampleStatus = wait_for(lambda: self.status.final(rid), 30,
                                    lambda: S.describe(self.status.of(rid)))
        return st

    def send(self, payload: bytes, *, retain: bool = False) -> None:
        self.fleet.host.publish_wait(self.fleet.topics.samples_request(DEV), payload,
                                     retain=retain)


class SamplesAgent(AgentProc):
    def write_config(self, window_s: float) -> None:
        super().write_config(window_s)
        with open(self.config, "a") as f:
            f.write("[samples]\nchunks_per_s = 16.0\n")

    def serves(self) -> bool:
        try:
            status, meta = self.get("/v2/models/cls")
        except OSError:
            return False
        return status == 200 and meta["versions"] == ["1"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("samples-e2e")
    with Mosquitto(tmp / "broker") as broker:
        fleet = Fleet(tmp, broker)
        art = S.classifier(tmp)
        fleet.repo.add_artifact(art.path)
        agent = SamplesAgent(fleet, tmp, DEV)
        try:
            agent.start()
            publish_deployment(fleet.host, create_deployment(
                fleet.repo, model="cls", fleet=FLEET, version="1", devices=[DEV]))
            wait_for(agent.serves, 60, lambda: agent.log.read_text()[-3000:])
            yield Rig(fleet, agent, tmp)
        finally:
            agent.kill()
            fleet.close()


@pytest.fixture
def allowed(rig: Rig, capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    repo = str(rig.fleet.repo.path)
    assert main(["samples", "allow", "--device", DEV, "--repo", repo, "--fleet", FLEET]) == 0
    yield
    assert main(["samples", "deny", "--device", DEV, "--repo", repo, "--fleet", FLEET]) == 0


def test_low_confidence_samples_come_back_exactly_within_the_byte_limit(
        rig: Rig, allowed: None, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(rig.fleet.repo.path)
    code, out, err = rig.cli(capsys, "samples", "request", repo, "--device", DEV,
                             "--model", "cls", "--rule", "low_confidence", "--count", "3",
                             "--threshold", "0.5", "--max-bytes", "8KiB", "--outputs")
    assert code == 0, err
    rid = out.strip()
    rig.collecting(rid, 0)
    # Confident (top score ~1) and unconfident (0.25) rows in turn, each told apart by a
    # small tag; a batch of two, one of each, as well.
    for k in range(4):
        rig.infer(S.row(9.0, 0.1 * k))
        rig.infer(S.row(0.0, 0.1 * k + 0.05))
        if k == 0:
            rig.infer(np.concatenate([S.row(0.0, 0.07), S.row(9.0, 0.08)]))
    st = rig.final(rid)
    assert (st.state, st.count) == ("ready", 3) and st.size <= 8 * 1024
    cal = rig.tmp / "low.npz"
    code, out, err = rig.cli(capsys, "samples", "pull", rid, "--device", DEV, "--out",
                             str(cal), "--wait", "30s")
    assert code == 0, err
    assert "3 sample(s) of x" in out
    with np.load(cal) as z:
        assert z.files == ["x"]
        np.testing.assert_allclose(z["x"][:, 1], [0.05, 0.07, 0.15], rtol=1e-6)
    with np.load(cal.with_suffix(".extra.npz")) as z:
        assert np.all(z["scores"] < 0.5) and z["out.probs"].shape == (3, 4)
    # What the operator does next: evaluate a conversion on what the field saw.
    conv = subprocess.run(
        [*edge_sdk_cli(), "convert", str(rig.tmp / "cls-1.onnx"), "-o",
         str(rig.tmp / "converted"), "--quantize", "none", "--eval", str(cal)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-2000:]


def test_request_to_a_device_not_allowed_is_refused_by_the_cli(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(rig.fleet.repo.path)
    code, _, err = rig.cli(capsys, "samples", "request", repo, "--device", DEV,
                           "--model", "cls", "--rule", "random")
    assert code != 0
    assert err.count("\n") == 1 and "does not allow field samples" in err
    assert "samples allow --device samp-1" in err
    # A group's permission counts for its devices; the list shows it.
    assert main(["samples", "allow", "--group", "lobby", "--repo", repo, "--fleet",
                 FLEET]) == 0
    capsys.readouterr()
    assert main(["samples", "list", "--repo", repo, "--fleet", FLEET]) == 0
    assert "group  lobby" in capsys.readouterr().out
    assert main(["samples", "deny", "--group", "lobby", "--repo", repo, "--fleet",
                 FLEET]) == 0
    audit = json.loads(subprocess.run(
        [*edge_sdk_cli(), "audit", "--repo", repo, "--json"], cwd=ROOT,
        capture_output=True, text=True, timeout=60).stdout or "[]")
    actions = [a["action"] for a in audit]
    assert "samples.allow" in actions and "samples.deny" in actions


@pytest.mark.parametrize("case", ["unsigned", "foreign key", "other device", "expired"])
def test_bad_requests_are_refused_with_one_line_on_samples_res(rig: Rig, case: str) -> None:
    req = S.request(DEV, fleet=FLEET)
    if case == "unsigned":
        payload = json.dumps({"signed": {"id": req.id, "type": "x"},
                              "signatures": []}).encode()
    elif case == "foreign key":
        payload = S.signed(req, CryptoSigner.generate_ed25519())
    elif case == "other device":
        payload = S.signed(S.request("samp-9", fleet=FLEET, id=req.id), rig.signer)
    else:
        payload = S.signed(S.request(DEV, fleet=FLEET, id=req.id, ttl=timedelta(seconds=1),
                                     now=req.issued - timedelta(hours=1)), rig.signer)
    rig.send(payload)
    st = rig.final(req.id)
    assert st.state == "refused" and st.reason and "\n" not in st.reason
    words = {"unsigned": "signatures from nobody", "foreign key": "not signed by the trusted",
             "other device": "is for 'samp-9'", "expired": "expired"}[case]
    assert words in st.reason


def test_replayed_request_is_refused(rig: Rig) -> None:
    first = S.signed(S.request(DEV, fleet=FLEET, rule="disagreement"), rig.signer)
    a = json.loads(first)["signed"]["id"]
    rig.send(first)
    rig.collecting(a, 0)
    b = S.request(DEV, fleet=FLEET, rule="disagreement")
    rig.send(S.signed(b, rig.signer))
    rig.collecting(b.id, 0)
    rig.send(first)
    st = rig.final(a)
    assert st.state == "refused" and "replayed" in st.reason


def test_hostile_chunk_requests_are_bounded_and_answered_in_one_line(rig: Rig) -> None:
    req = S.request(DEV, fleet=FLEET, rule="random", count=2, threshold=2,
                    max_bytes=1 << 20)
    rig.send(S.signed(req, rig.signer))
    rig.collecting(req.id, 0)
    rig.infer(np.concatenate([S.row(1.0), S.row(2.0)]))
    st = rig.final(req.id)
    assert st.state == "ready"
    t = rig.fleet.topics
    answers: list[ChunkResponse] = []
    rig.fleet.host.subscribe(t.samples_put(DEV),
                             lambda _, p: answers.append(ChunkResponse.decode(p)))
    get = t.samples_get(DEV)

    def ask(corr: int, path: str, off: int = 0, n: int = 64) -> None:
        rig.fleet.host.publish(get, ChunkRequest(corr.to_bytes(16, "big"), path, off, 1, n)
                               .encode())

    for raw in (b"{", b'{"v":1,"id":"' + b"ab" * 16 + b'","path":"samples/../../etc",'
                b'"off":0,"len":1}', b"x" * 100_000):
        rig.fleet.host.publish(get, raw)
    ask(1, f"samples/{'cd' * 16}")  # no such bundle
    ask(2, f"samples/{req.id}", off=10**9)  # past its end
    t0 = time.monotonic()
    for i in range(200):  # 200 requests of 64 one-byte chunks
        ask(1000 + i, f"samples/{req.id}")
    # Requests past the device's small queue are dropped unanswered (the host asks again
    # after its timeout): a sentinel, asked until answered, marks the end of the flood.
    sentinel = (9999).to_bytes(16, "big")
    for _ in range(60):
        ask(9999, f"samples/{req.id}", n=1)
        try:
            wait_for(lambda: any(a.corr == sentinel for a in answers), 1)
            break
        except AssertionError:
            continue
    assert any(a.corr == sentinel for a in answers)
    elapsed = time.monotonic() - t0
    ok = [a for a in answers if a.status == ChunkResponse.OK]
    # chunks_per_s = 16 with a burst of 16: never more, however many ask.
    assert len(ok) <= 16 + 16 * elapsed + 16
    assert any(a.status == ChunkResponse.SLOW_DOWN for a in answers)
    bad = [a for a in answers if a.status == ChunkResponse.BAD_REQUEST]
    assert any("not a file served here" in a.reason for a in bad)
    assert any("past the end" in a.reason for a in bad)
    nf = [a for a in answers if a.status == ChunkResponse.NOT_FOUND]
    assert any("no bundle" in a.reason for a in nf)
    assert all("\n" not in a.reason for a in answers if a.status != ChunkResponse.OK)
    rig.infer(S.row(0.0))  # still serving


def test_pull_refuses_a_bundle_that_is_not_the_one_announced(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    req = S.request(DEV, fleet=FLEET, rule="random", count=1, threshold=1)
    rig.send(S.signed(req, rig.signer))
    rig.collecting(req.id, 0)
    rig.infer(S.row(3.0))
    st = rig.final(req.id)
    assert st.state == "ready"
    forged = SampleStatus(req.id, "ready", st.count, st.size, "0" * 64)
    rig.fleet.host.publish_wait(rig.fleet.topics.samples_status(DEV),
                                json.dumps(forged.to_json()).encode(), retain=True)
    out = rig.tmp / "forged.npz"
    code, _, err = rig.cli(capsys, "samples", "pull", req.id, "--device", DEV, "--out",
                           str(out))
    assert code != 0 and "not the" in err and "nothing written" in err
    assert err.count("\n") == 1 and not out.exists()


def test_a_bundle_of_many_chunks_comes_through_the_devices_slow_downs(rig: Rig) -> None:
    from edge_sdk.samples._host import pull_bundle
    from edge_sdk.transport import FetchConfig

    req = S.request(DEV, fleet=FLEET, rule="random", count=1000, threshold=1000,
                    outputs=True, max_bytes=4 << 20)
    rig.send(S.signed(req, rig.signer))
    rig.collecting(req.id, 0)
    rows = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4) / 1000
    for part in np.split(rows, 4):
        rig.infer(part)
    st = rig.final(req.id)
    assert (st.state, st.count) == ("ready", 1000) and st.size > 32 * 1024
    answers: list[int] = []
    sub = rig.fleet.host.subscribe(rig.fleet.topics.samples_put(DEV),
                                   lambda _, p: answers.append(ChunkResponse.decode(p).status))
    try:
        got = pull_bundle(rig.fleet.host, DEV, st, rig.tmp / "many.npz",
                          config=FetchConfig(chunk_size=1024, min_chunk_size=1024))
    finally:
        sub.cancel()
    assert got.count == 1000
    with np.load(got.path) as z:
        np.testing.assert_array_equal(np.sort(z["x"][:, 0]), rows[:, 0])
    assert ChunkResponse.SLOW_DOWN in answers  # 16 chunks a second, a burst of 16


def test_restart_mid_collection_keeps_the_samples(rig: Rig) -> None:
    req = S.request(DEV, fleet=FLEET, rule="low_confidence", count=3, threshold=0.5)
    rig.send(S.signed(req, rig.signer), retain=True)
    rig.collecting(req.id, 0)
    rig.infer(S.row(0.0, 0.5))
    rig.collecting(req.id, 1)
    rig.agent.kill()
    rig.agent.start()
    wait_for(rig.agent.serves, 60)
    rig.infer(S.row(0.0, 0.6))
    rig.infer(S.row(0.0, 0.7))
    st = rig.final(req.id)
    assert (st.state, st.count) == ("ready", 3)
    cal = rig.tmp / "restart.npz"
    code = main(["samples", "pull", req.id, "--device", DEV, "--out", str(cal),
                 "--broker", rig.fleet.broker.url, "--fleet", FLEET])
    assert code == 0
    with np.load(cal) as z:
        np.testing.assert_allclose(z["x"][:, 1], [0.5, 0.6, 0.7], rtol=1e-6)
    rig.fleet.host.publish_wait(rig.fleet.topics.samples_request(DEV), b"", retain=True)


def test_disk_reserve_keeps_samples_off_a_full_disk(rig: Rig) -> None:
    rig.agent.kill()
    rig.agent.limits = {"reserve_bytes": 1 << 60}
    rig.agent.write_config(0.3)
    try:
        rig.agent.start()
        wait_for(rig.agent.serves, 60, lambda: rig.agent.log.read_text()[-3000:])
        req = S.request(DEV, fleet=FLEET, rule="low_confidence", count=2, threshold=0.5)
        # Retained, as the CLI sends it: the agent may serve before its link is up.
        rig.send(S.signed(req, rig.signer), retain=True)
        rig.collecting(req.id, 0)
        rig.infer(S.row(0.0))

        def told() -> SampleStatus | None:
            st = rig.status.last(req.id)
            return st if st is not None and "disk reserve" in st.reason else None

        st = wait_for(told, 30, lambda: S.describe(rig.status.of(req.id)))
        assert st.count == 0
        assert not list((rig.agent.state / "samples").glob("*/s*.npz"))
    finally:
        rig.fleet.host.publish_wait(rig.fleet.topics.samples_request(DEV), b"", retain=True)
        rig.agent.kill()
        rig.agent.limits = {}
        rig.agent.write_config(0.3)
        rig.agent.start()

