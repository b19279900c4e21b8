"""The fleet page's JSON API against a real SQLite fleet database filled through the
registry's ingestion of agent-shaped reports and the controller's rollout records; and
the socket layer under hostile clients."""

from __future__ import annotations

import copy
import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edge_sdk.fleet import (
    AssignmentChange,
    FleetDB,
    FleetUsageError,
    RolloutSpec,
    assign_devices,
    start_rollout,
)
from edge_sdk.fleet import _machine as m
from edge_sdk.fleet._members import members
from edge_sdk.fleet._registry import ingest_event, ingest_state
from edge_sdk.fleet._store import load_state, save_state
from edge_sdk.fleet._web import FleetApi, WebConfig, WebServer
from edge_sdk.trust._client import Download
from tests import _fleet_records
from tests._fleet_records import FLEET, event, state
from tests._process import wait_for
from tests._rollout_sim import Sim

db = _fleet_records.db  # agent reports and assignments ingested, a fresh one per test


def get(api: FleetApi, target: str) -> tuple[int, Any]:
    status, ctype, body = api.handle("GET", target)
    assert ctype.startswith("application/json") or status == 200
    return status, json.loads(body) if ctype.startswith("application/json") else body


def test_devices_are_listed_per_fleet_and_filtered_by_group_tag_model_online(db) -> None:
    api = FleetApi(db, fleet=FLEET)
    status, devs = get(api, "/api/devices")
    assert status == 200
    assert [d["id"] for d in devs] == ["cam-0", "cam-1", "cam-2", "gate 1 ü"]
    assert devs[0]["hardware"]["arch"] == "aarch64" and devs[0]["groups"] == ["cams"]
    assert [d["id"] for d in get(api, "/api/devices?group=gates")[1]] == ["gate 1 ü"]
    assert [d["id"] for d in get(api, "/api/devices?online=false")[1]] == ["gate 1 ü"]
    assert len(get(api, "/api/devices?online=true&model=adder%401")[1]) == 3
    assert len(get(api, "/api/devices?tag=site%3Dnorth")[1]) == 4
    assert get(api, "/api/devices?tag=site%3Dsouth")[1] == []
    # Empty filters (the page's blank form) mean no filter.
    assert len(get(api, "/api/devices?group=&tag=&model=&online=")[1]) == 4
    assert len(get(FleetApi(db), "/api/devices?group=cams")[1]) == 4  # every fleet


def test_a_device_comes_with_its_history_newest_first(db) -> None:
    api = FleetApi(db, fleet=FLEET)
    status, doc = get(api, "/api/devices/cam-0")
    assert status == 200 and doc["device"]["version"] == "1"
    kinds = [e["kind"] for e in doc["history"]]
    assert kinds == ["rolled_back", "downloaded", "state:registered"]
    assert doc["history"][0]["reason"] == "health window: 3 errors"
    assert len(get(api, "/api/devices/cam-0?limit=1")[1]["history"]) == 1
    # An id with a space and non-ASCII travels percent-encoded.
    assert get(api, "/api/devices/gate%201%20%C3%BC")[1]["device"]["online"] is False


def test_rollout_progress_per_wave_follows_the_controllers_record(db) -> None:
    api = FleetApi(db, fleet=FLEET)
    rid = start_rollout(db, fleet=FLEET, model="adder", version="2",
                        selector={"groups": ["cams"]}, spec=RolloutSpec(waves=("1", "100%")),
                        actor="tester")
    with db.begin() as c:
        st = load_state(c, rid)
    new, _ = m.step(st, m.Tick(time.time(), members(db, FLEET, {"groups": ["cams"]}), []))
    with db.begin() as c:
        save_state(c, new, st)
    r = get(api, f"/api/rollouts/{rid}")[1]
    assert r["status"] == "running" and r["waves"] == 2
    assert [p["devices"] for p in r["progress"]] == [1, 2]
    # The device of wave 1 fails: the progress and the failure reason show it.
    with db.begin() as c:
        st = load_state(c, rid)
    first = next(d for d, p in st.devices.items() if p.wave == 1)
    st2 = copy.deepcopy(st)  # save_state writes what differs from the old state
    st2.devices[first].status, st2.devices[first].reason = "failed", "smoke test: NaN"
    with db.begin() as c:
        save_state(c, st2, st)
    r = get(api, "/api/rollouts")[1][0]
    assert r["id"] == rid and r["progress"][0]["by_status"] == {"failed": 1}
    assert r["failures"] == [{"device": first, "status": "failed", "outcome": "failed",
                              "reason": "smoke test: NaN"}]
    assert get(api, "/api/audit")[1][-1]["action"] == "rollout.start"
    assert get(FleetApi(db, fleet="other"), f"/api/rollouts/{rid}")[0] == 404


def _aborted_rollout(db: FleetDB) -> tuple[int, dict[str, m.DeviceProgress]]:
    """adder 2 to cam-0..2 in waves 1, 2, 3 with the real state machine: wave 1 commits,
    wave 2's device rolls itself back, which aborts the rollout; the controller's signed
    rollback sends wave 1 back to version 1 and wave 3 is never sent."""
    rid = start_rollout(db, fleet=FLEET, model="adder", version="2",
                        selector={"groups": ["cams"]},
                        spec=RolloutSpec(waves=("1", "2", "3"), wave_timeout=60),
                        actor="tester")
    with db.begin() as c:
        st = load_state(c, rid)
    sim = Sim(st.spec, devices=("cam-0", "cam-1", "cam-2"))
    sim.state = copy.deepcopy(st)
    sim.tick(answer=False)
    sim.tick()  # wave 1 commits, wave 2 is sent
    second = next(d for d, p in sim.state.devices.items() if p.wave == 2)
    sim.results[second] = "rolled_back"
    sim.run()
    assert sim.state.status == "aborted"
    with db.begin() as c:
        save_state(c, sim.state, st)
    return rid, sim.state.devices


def test_an_aborted_rollout_counts_the_wave_it_sent_back_as_rolled_back_not_committed(
        db, tmp_path, capsys) -> None:
    rid, devs = _aborted_rollout(db)
    r = get(FleetApi(db, fleet=FLEET), f"/api/rollouts/{rid}")[1]
    assert r["status"] == "aborted" and r["reason"].startswith("wave 2 of 3: 1 of 2")
    # The controller's record still says wave 1 committed; what happened is a rollback.
    assert r["progress"][0]["by_status"] == {"committed": 1}
    assert [(p["by_outcome"], p["outcome"]) for p in r["progress"]] == [
        ({"rolled_back": 1}, "rolled_back"), ({"rolled_back": 1}, "rolled_back"),
        ({"skipped": 1}, "skipped")]
    first = next(d for d, p in devs.items() if p.wave == 1)
    failure = next(f for f in r["failures"] if f["device"] == first)
    assert failure["outcome"] == "rolled_back"
    assert failure["reason"] == f"rolled back to 1 after the rollout was aborted: {r['reason']}"
    # `rollout status` tells the same.
    capsys.readouterr()
    from edge_sdk.cli import main

    assert main(["rollout", "status", str(rid), "--db", db.url]) == 0
    out = capsys.readouterr().out
    assert "wave 1: 1 device(s): 1 rolled back" in out and "committed" not in \
        out.split("wave 1:")[1].split("\n")[0]
    assert "wave 3: 1 device(s): 1 skipped" in out
    assert main(["rollout", "list", "--db", db.url]) == 0
    assert "0/3 committed" in capsys.readouterr().out


def test_a_devices_updates_say_how_each_was_downloaded_and_whether_it_was_rolled_back(
        db) -> None:
    rid, devs = _aborted_rollout(db)
    first = next(d for d, p in devs.items() if p.wave == 1)
    second = next(d for d, p in devs.items() if p.wave == 2)
    p1, p2 = devs[first], devs[second]
    assert p1.counter is not None and p1.rollback_counter is not None
    assert p2.counter is not None
    v = {"name": "adder", "sha256": "ab" * 32}
    delta = Download("delta", 5120, "1", full_bytes=4194432).to_json()
    full = Download("full", 4194432, None, full_bytes=4194432).to_json()
    with db.begin() as c:  # the events the agents send, as they send them
        for payload in (
                event(first, "downloaded", p1.counter, "2", download=delta),
                event(first, "committed", p1.counter, "2", model={**v, "version": "2"}),
                event(first, "verified", p1.rollback_counter, "1", source="local copy"),
                event(first, "committed", p1.rollback_counter, "1",
                      model={**v, "version": "1"}),
                event(second, "downloaded", p2.counter, "2", download=full),
                event(second, "rolled_back", p2.counter, "2", model={**v, "version": "2"},
                      restored={**v, "version": "1"}, reason="health window: 3 errors")):
            assert ingest_event(c, FLEET, json.loads(payload)["device"], payload)
    api = FleetApi(db, fleet=FLEET)
    ups = get(api, f"/api/devices/{first}")[1]["updates"]
    # (the fixture's cam-0 also has deployment 5, older than the rollout's)
    assert [u["deployment"] for u in ups[:2]] == [p1.rollback_counter, p1.counter]
    back, fwd = ups[:2]
    assert fwd["version"] == "2" and fwd["rollout"] == rid
    assert fwd["download_text"] == "delta from 1: 5120 bytes vs full 4194432 bytes (0.1 %)"
    assert fwd["rolled_back"]["by"] == "rollout" and fwd["rolled_back"]["to"] == "1"
    reason = get(api, f"/api/rollouts/{rid}")[1]["reason"]
    assert fwd["outcome_text"] == (f"committed, then rolled back to 1 by rollout {rid}'s "
                                   f"abort: {reason}")
    assert back["download_text"] == "a copy the device held (nothing downloaded)"
    assert back["outcome_text"] == f"committed (the rollback of rollout {rid}, away from 2)"
    (own,) = get(api, f"/api/devices/{second}")[1]["updates"]
    assert own["download_text"] == "full: 4194432 bytes"
    assert own["outcome_text"] == "rolled back by the device to 1: health window: 3 errors"


def test_a_silent_device_is_not_counted_online_by_model(db) -> None:
    now = time.time()
    with db.begin() as c:
        assert ingest_state(c, FLEET, "cam-quiet", state("cam-quiet", "1", groups=["cams"]),
                            now=now - 600)
    db.add_registry_stats(FLEET, {}, progress={"caught_up": now, "listening_since": now - 900,
                                               "silent_after_s": 60})
    api = FleetApi(db, fleet=FLEET)
    quiet = get(api, "/api/devices/cam-quiet")[1]["device"]
    assert quiet["silent"] is True and quiet["online"] is False
    online = sum(d["online"] for d in get(api, "/api/devices?model=adder%401")[1])
    rows = get(api, "/api/models")[1]
    assert {"model": "adder", "version": "1", "devices": 4, "online": online} in rows
    assert online == 3


def test_models_count_devices_per_version(db) -> None:
    rows = get(FleetApi(db, fleet=FLEET), "/api/models")[1]
    assert rows == [{"model": None, "version": None, "devices": 1, "online": 0},
                    {"model": "adder", "version": "1", "devices": 3, "online": 3}]


def test_the_page_and_its_assets_are_served_without_outside_references(db) -> None:
    api = FleetApi(db, fleet=FLEET)
    for path in ("/", "/static/page.js", "/static/page.css"):
        status, _, body = api.handle("GET", path)
        assert status == 200 and b"http://" not in body and b"https://" not in body, path
    assert b'<table id="devices">' in api.handle("GET", "/")[2]
    assert b"innerHTML" not in api.handle("GET", "/static/page.js")[2]


@pytest.mark.parametrize(("target", "status", "words"), [
    ("/nope", 404, "no page"),
    ("/api/nope", 404, "no API route"),
    ("/api/devices/", 400, "device id"),
    ("/api/devices/nobody", 404, "no device 'nobody'"),
    ("/api/devices/%ff%fe", 400, "UTF-8"),
    ("/api/devices/a%00b", 400, "printable"),
    ("/api/devices/" + "x" * 200, 400, "1..128"),
    ("/api/rollouts/abc", 400, "must be a number"),
    ("/api/rollouts/-1", 400, "must be a number"),
    ("/api/rollouts/99999999999999999999", 400, "must be a number"),
    ("/api/rollouts/42", 404, "no rollout 42"),
    ("/api/devices?online=maybe", 400, "online must be"),
    ("/api/devices?colour=red", 400, "unknown query parameter 'colour'"),
    ("/api/devices?group=a&group=b", 400, "given twice"),
    ("/api/devices?" + "&".join(f"k{i}=1" for i in range(50)), 400, "max_query_fields"),
    ("/api/devices?group=" + "g" * 300, 400, "longer than 256"),
    ("/api/devices?group=%ff", 400, "UTF-8"),
    ("/api/devices?" + "q" * 5000, 414, "max_target_bytes"),
    ("/api/audit?limit=0", 400, "limit must be"),
    ("/api/audit?limit=1e9", 400, "limit must be"),
    ("/api/devices/cam-0?limit=99999", 400, "limit must be"),
    ("/api/models?x=1", 400, "unknown query parameter"),
    ("http://evil.example/api/devices", 400, "must be a path"),
])
def test_hostile_requests_get_a_one_line_4xx(db, target: str, status: int, words: str) -> None:
    got, ctype, body = FleetApi(db, fleet=FLEET).handle("GET", target)
    assert (got, ctype) == (status, "application/json")
    msg = json.loads(body)["error"]
    assert words in msg and "\n" not in msg and len(msg) < 300


def test_writes_are_refused_and_a_broken_database_is_503(db, tmp_path) -> None:
    api = FleetApi(db, fleet=FLEET)
    assert api.handle("POST", "/api/devices")[0] == 405
    db.engine.dispose()
    (tmp_path / "fleet.db").unlink()
    (tmp_path / "fleet.db").mkdir()  # now unusable as a database
    status, _, body = api.handle("GET", "/api/devices")
    assert status == 503 and "not available" in json.loads(body)["error"]


def test_non_loopback_binds_are_refused_unless_allowed() -> None:
    with pytest.raises(FleetUsageError, match="--http-allow-remote"):
        WebConfig.parse("0.0.0.0:8700")
    with pytest.raises(FleetUsageError, match="HOST:PORT"):
        WebConfig.parse("127.0.0.1:http")
    assert WebConfig.parse("0.0.0.0:8700", allow_remote=True).host == "0.0.0.0"
    assert WebConfig.parse("localhost:1").host == "localhost"
    assert WebConfig.parse("[::1]:8700").host == "::1"
    assert WebConfig.parse("8701").port == 8701


@pytest.fixture()
def server(db: FleetDB) -> Iterator[WebServer]:
    cfg = WebConfig(port=0, max_connections=4, timeout_s=1.0)
    with WebServer(db, fleet=FLEET, config=cfg) as s:
        yield s


def _raw(server: WebServer, data: bytes, *, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1][:-1])),
                                  timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _http(server: WebServer, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    host, port = server.url[len("http://"):-1].rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def test_the_socket_layer_serves_json_with_a_strict_policy(server) -> None:
    status, headers, body = _http(server, "GET", "/api/devices")
    assert status == 200 and len(json.loads(body)) == 4
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert headers["Cache-Control"] == "no-store"
    status, headers, body = _http(server, "DELETE", "/api/devices")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert "read-only" in json.loads(body)["error"]


def test_garbage_slow_and_oversized_clients_are_answered_and_the_server_serves_on(
        server) -> None:
    assert b"400" in _raw(server, b"\x00\xff garbage\r\n\r\n").split(b"\r\n")[0]
    assert b" 414 " in _raw(server, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")[:40]
    assert b" 501 " in _raw(server, b"BREW /pot HTTP/1.1\r\nHost: localhost\r\n\r\n")[:40]
    body = _raw(server, b"GET /api/devices HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Length: 5\r\n\r\nhello")
    assert b" 413 " in body[:40] and b"no request body" in body
    # A client that sends half a request and stalls is answered 408 after timeout_s; one
    # that sends nothing is closed quietly.
    assert b" 408 " in _raw(server, b"GET /api/devices HTTP/1.1\r\nHost")[:40]
    assert _raw(server, b"") == b""
    assert _http(server, "GET", "/api/models")[0] == 200


def test_connections_past_max_connections_get_503_until_they_close(db: FleetDB) -> None:
    # A read timeout far longer than the test: the held connections cannot time out and
    # free their slots while a loaded machine is slow to serve the extra one.
    cfg = WebConfig(port=0, max_connections=4, timeout_s=30.0)
    with WebServer(db, fleet=FLEET, config=cfg) as server:
        port = int(server.url.rsplit(":", 1)[1][:-1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            wait_for(lambda: server_busy(server), 10, lambda: "never answered 503")
        finally:
            for s in held:
                s.close()
        wait_for(lambda: _http(server, "GET", "/api/models")[0] == 200, 10)


def test_a_burst_of_connections_waits_in_the_listen_queue_instead_of_being_dropped(
        db: FleetDB) -> None:
    # Before the page accepts anything, the kernel completes each handshake as long as the
    # listen queue has room. A queue of socketserver's 5 drops the 7th SYN: that client
    # waits for retransmits (1 s, 3 s, ...), here forever, as nothing is accepted yet.
    cfg = WebConfig(port=0, max_connections_per_client=32)
    server = WebServer(db, fleet=FLEET, config=cfg)  # listening, not yet accepting
    burst: list[socket.socket] = []
    try:
        for _ in range(32):
            burst.append(socket.create_connection(("127.0.0.1", _port(server)), timeout=10))
        server.start()
        for s in burst:
            s.sendall(b"GET /api/models HTTP/1.1\r\nHost: localhost\r\nConnection: close"
                      b"\r\n\r\n")
        for s in burst:
            assert _parts(_read_all(s))[0] == 200
    finally:
        for s in burst:
            s.close()
        server.stop()


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def server_busy(server: WebServer) -> bool:
    return b" 503 " in _raw(server, b"GET /api/devices HTTP/1.1\r\n\r\n")[:40]


def test_serve_refuses_a_public_http_bind_in_one_line(tmp_path, capsys) -> None:
    from edge_sdk.cli import main

    code = main(["serve", "--repo", str(tmp_path), "--db", f"sqlite:///{tmp_path / 'f.db'}",
                 "--broker", "mqtt://127.0.0.1:1", "--http", "0.0.0.0:8700"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--http-allow-remote" in err and "\n" not in err
    code = main(["serve", "--repo", str(tmp_path), "--db", f"sqlite:///{tmp_path / 'f.db'}",
                 "--broker", "mqtt://127.0.0.1:1", "--http", "127.0.0.1:8700",
                 "--http-allow-host", "https://fleet.example.com"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--http-allow-host" in err and "\n" not in err


def test_rollouts_leave_out_a_registered_id_no_deployment_can_name(db) -> None:
    # An older agent's dotted id (NATS refuses a '.' in a topic) or the space above: signing
    # a wave that named it would fail the whole wave, so the controller never picks it.
    with db.begin() as c:
        assert ingest_state(c, FLEET, "cam.9", state("cam.9", "1", groups=["cams"]))
    assign_devices(db, fleet=FLEET, actor="tester",
                   changes={"cam.9": AssignmentChange(("cams",))})
    assert set(members(db, FLEET, {"groups": ["cams"]})) == {"cam-0", "cam-1", "cam-2"}
    assert set(members(db, FLEET, {"groups": ["cams", "gates"]})) == {"cam-0", "cam-1",
                                                                      "cam-2"}
    assert members(db, FLEET, {"devices": ["cam.9", "gate 1 ü"]}) == {}


def _port(server: WebServer) -> int:
    return int(server.url.rsplit(":", 1)[1][:-1])


def _parts(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one raw response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    line, *lines = head.decode("latin-1").split("\r\n")
    assert line.startswith("HTTP/1.1 "), raw[:200]
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    return int(line.split(" ")[1]), headers, body


@pytest.mark.parametrize(("host", "status"), [
    (b"evil.example", 421),                     # a rebound name: the attacker's own
    (b"evil.example:8700", 421),
    (b"127.0.0.1.evil.example", 421),
    (b"LOCALHOST.evil.example.", 421),
    (b"127.0.0.1:8700", 200),                   # an address is never a rebound name
    (b"[::1]:8700", 200),
    (b"localhost", 200),
    (b"fleet.localhost", 200),                  # browsers resolve *.localhost themselves
    (b"Fleet.Example.COM.", 200),               # allowed_hosts, any case, trailing dot
    (b"fleet.example.com:443", 200),
    (b"a b", 400),
    (b"x:y", 400),
    (b"[::1", 400),
    (b"", 400),
])
def test_a_dns_rebinding_host_is_refused(db, host: bytes, status: int) -> None:
    cfg = WebConfig(port=0, allowed_hosts=("fleet.example.com",))
    with WebServer(db, fleet=FLEET, config=cfg) as server:
        got, headers, body = _parts(_raw(server, b"GET /api/models HTTP/1.1\r\nHost: " + host
                                                 + b"\r\nConnection: close\r\n\r\n"))
        assert got == status, body
        if status == 421:
            assert "does not name this server" in json.loads(body)["error"]
            assert "allowed_hosts" in json.loads(body)["error"]
            assert headers["connection"] == "close"


def test_a_request_without_host_is_refused_on_http_1_1_only(server) -> None:
    assert _parts(_raw(server, b"GET /api/models HTTP/1.1\r\n\r\n"))[0] == 400
    assert _parts(_raw(server, b"GET /api/models HTTP/1.0\r\n\r\n"))[0] == 200
    with pytest.raises(FleetUsageError, match="host name"):
        WebConfig(allowed_hosts=("https://fleet.example.com",))
    with pytest.raises(FleetUsageError, match="host name"):
        WebConfig(allowed_hosts=("fleet.example.com:8700",))


GET = b"GET /api/models HTTP/1.1\r\nHost: localhost\r\n"
#: Requests two readers could read differently, or that no version of HTTP allows.
AMBIGUOUS = [
    ("no version (HTTP/0.9)", b"GET /api/models\r\n\r\n", 400, "bad request line"),
    ("two Content-Length", GET + b"Content-Length: 0\r\nContent-Length: 0\r\n\r\n", 400,
     "duplicate Content-Length"),
    ("two different Content-Length", GET + b"Content-Length: 0\r\nContent-length: 7\r\n\r\n"
     b"GET /x ", 400, "duplicate"),
    ("two Host", GET + b"Host: evil.example\r\n\r\n", 400, "duplicate Host"),
    ("obs-fold", GET + b"X-A: 1\r\n  folded\r\n\r\n", 400, "obs-fold"),
    ("obs-fold with a tab", GET + b"X-A: 1\r\n\tContent-Length: 5\r\n\r\n", 400, "obs-fold"),
    ("header line without a colon", GET + b"NoColonHere\r\n\r\n", 400, "no colon"),
    ("space before the colon", GET + b"Content-Length : 0\r\n\r\n", 400, "malformed header"),
    ("empty header name", GET + b": value\r\n\r\n", 400, "malformed header"),
    ("bare LF line ends", b"GET /api/models HTTP/1.1\nHost: localhost\n\n", 400, "CRLF"),
    ("bare LF in a header", GET + b"X-A: 1\nX-B: 2\r\n\r\n", 400, "CRLF"),
    ("bare CR in a value", GET + b"X-A: 1\rContent-Length: 5\r\n\r\n", 400,
     "control character"),
    ("NUL in a value", GET + b"X-A: a\x00b\r\n\r\n", 400, "control character"),
    ("Content-Length with a sign", GET + b"Content-Length: +0\r\n\r\n", 400,
     "invalid Content-Length"),
    ("chunked body", GET + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 413, "no request"),
    ("absolute target", b"GET http://evil.example/api/models HTTP/1.1\r\n\r\n", 400,
     "bad request line"),
    ("target with raw non-ASCII", "GET /api/dévices HTTP/1.1\r\n\r\n".encode(), 400,
     "bad request line"),
    ("two spaces", b"GET  /api/models HTTP/1.1\r\n\r\n", 400, "bad request line"),
    ("HTTP/2.0 line", b"GET /api/models HTTP/2.0\r\n\r\n", 505, "not supported"),
    ("headers over max_header_bytes", GET + b"X-A: b\r\n" * 2000 + b"\r\n", 431,
     "max_header_bytes"),
]


@pytest.mark.parametrize(("what", "raw", "status", "words"), AMBIGUOUS,
                         ids=[a[0] for a in AMBIGUOUS])
def test_an_ambiguous_request_gets_a_complete_4xx_and_nothing_after_it_is_read(
        server, what: str, raw: bytes, status: int, words: str) -> None:
    # A smuggled second request follows each one: it must never be answered.
    out = _raw(server, raw + b"GET /api/audit HTTP/1.1\r\nHost: localhost\r\n\r\n")
    got, headers, body = _parts(out)
    assert got == status, out[:300]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert headers["x-content-type-options"] == "nosniff"
    msg = json.loads(body)["error"]
    assert words in msg and "\n" not in msg and len(msg) < 300, msg
    assert out.count(b"HTTP/1.1 ") == 1, out
    assert _http(server, "GET", "/api/models")[0] == 200


def test_a_request_line_without_a_version_is_answered_at_once(server) -> None:
    # An HTTP/0.9 client sends one line and waits: it gets a complete HTTP/1.1 400 then,
    # not a 408 once the deadline has passed, and not a bare body.
    got, headers, body = _parts(_raw(server, b"GET /api/models\r\n"))
    assert got == 400 and "bad request line" in json.loads(body)["error"]
    assert headers["content-type"] == "application/json"


def test_empty_lines_before_a_request_and_pipelined_requests_are_served(server) -> None:
    out = _raw(server, b"\r\n\r\n" + GET + b"\r\n" + GET + b"Connection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 2, out[:300]


def test_the_page_opens_whatever_query_follows_its_path(db) -> None:
    api = FleetApi(db, fleet=FLEET)
    for target in ("/?%ff", "/?utm_source=x&utm_source=y", "/?<script>=1", "/?" + "q" * 1500):
        status, ctype, body = api.handle("GET", target)
        assert status == 200 and ctype.startswith("text/html") and b"<table" in body, target


def _trickle(port: int, source: str, stop: Any, results: list[str], every: float) -> None:
    """A slowloris client: a valid request started, then one header byte every ``every``
    seconds, each well inside any per-read timeout, until the server answers or closes."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30,
                                     source_address=(source, 0))
    except OSError as err:
        results.append(f"connect: {err}")
        return
    with s:
        try:
            s.sendall(b"GET /api/devices HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            s.settimeout(every)
            while not stop.is_set():
                try:
                    got = s.recv(4096)
                    results.append(got.split(b"\r\n")[0].decode() if got else "closed")
                    return
                except TimeoutError:
                    s.sendall(b"a")
        except OSError as err:
            results.append(f"reset: {type(err).__name__}")
            return
    results.append("still open")


def _slowloris(port: int, sources: list[str], every: float) -> tuple[Any, list[str], list[Any]]:
    import threading

    stop, results = threading.Event(), []  # type: ignore[var-annotated]
    threads = [threading.Thread(target=_trickle, args=(port, src, stop, results, every),
                                daemon=True) for src in sources]
    for t in threads:
        t.start()
    return stop, results, threads


def test_slowloris_from_one_address_leaves_the_page_to_everyone_else(db) -> None:
    # The attack: 32 connections trickling a byte at a time. With the defaults, one
    # address gets max_connections_per_client of them (the rest 429 at once), so a client
    # from elsewhere is served all along; and even those 8 end at the deadline.
    cfg = WebConfig(port=0)
    with WebServer(db, fleet=FLEET, config=cfg) as server:
        port = _port(server)
        stop, results, threads = _slowloris(port, ["127.0.0.2"] * 32, every=0.5)
        try:
            wait_for(lambda: any(r.startswith("HTTP/1.1 429") for r in results), 30,
                     lambda: f"no connection over the per-client cap refused: {results}")
            for _ in range(5):  # another client, served while the admitted ones trickle
                status, _, body = _http(server, "GET", "/api/devices")
                assert status == 200 and len(json.loads(body)) == 4
            # The admitted ones end at the whole-request deadline, however steady the
            # trickle: every one of the 32 is answered, 429 or 408.
            wait_for(lambda: len(results) == 32, cfg.timeout_s * 6, lambda: str(results))
            assert {r[:12] for r in results} == {"HTTP/1.1 429", "HTTP/1.1 408"}, results
        finally:
            stop.set()
            for t in threads:
                t.join(10)


def test_slowloris_from_many_addresses_is_cut_at_the_request_deadline(db) -> None:
    # 32 addresses, one connection each, fill every slot: a per-client cap cannot help, the
    # deadline on the whole request does. The trickle never stops; another client is still
    # served once the deadline has passed, while the attackers keep sending.
    cfg = WebConfig(port=0, max_connections=32, timeout_s=5.0)
    with WebServer(db, fleet=FLEET, config=cfg) as server:
        port = _port(server)
        sources = [f"127.0.1.{i}" for i in range(1, 33)]
        stop, results, threads = _slowloris(port, sources, every=0.25)
        try:
            # No probe until the attackers hold every slot: a probe admitted meanwhile
            # would take one of them (an attacker gets 503 instead), and once the probe
            # left, the next request would be served at once, before any deadline.
            wait_for(lambda: server.connections == 32, 30,
                     lambda: f"the attackers never held every slot: {results}")
            wait_for(lambda: _http(server, "GET", "/api/models")[0] == 200, 60,
                     lambda: f"never served again: {results}")
            # Every attacker is answered 408 at the deadline, however steady its trickle.
            wait_for(lambda: len(results) == 32, 60, lambda: f"not all cut: {results}")
            assert set(results) == {"HTTP/1.1 408 Request Timeout"}, results
        finally:
            stop.set()
            for t in threads:
                t.join(10)


def test_a_client_that_does_not_read_its_answer_is_dropped(db) -> None:
    # The other half of a slow client: it sends requests but never reads the answers. The
    # deadline bounds sending, so its slot comes back.
    cfg = WebConfig(port=0, max_connections=1, timeout_s=1.0)
    with WebServer(db, fleet=FLEET, config=cfg) as server:
        with db.begin() as c:  # answers big enough to fill the socket buffers
            for i in range(200):
                ingest_state(c, FLEET, f"big-{i}", state(f"big-{i}", "1", groups=["x" * 2000]))
        s = socket.create_connection(("127.0.0.1", _port(server)))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            s.sendall((b"GET /api/devices HTTP/1.1\r\nHost: localhost\r\n\r\n") * 20)
            wait_for(lambda: _http(server, "GET", "/api/models")[0] == 200, 30,
                     lambda: "the slot of a client that does not read was never freed")
        finally:
            s.close()
