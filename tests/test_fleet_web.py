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
from pathlib import Path
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
from edge_sdk.fleet._controller import load_state, members, save_state
from edge_sdk.fleet._registry import ingest_event, ingest_state
from edge_sdk.fleet._web import FleetApi, WebConfig, WebServer
from tests.test_agent_e2e import wait_for

FLEET = "plant1"
HW = {"arch": "aarch64", "cpu": "Cortex-A72", "runtimes": {"onnxruntime": "1.32.0"}}


def state(device: str, version: str | None, *, groups: list[str], online: bool = True,
          result: str | None = None, counter: int | None = None,
          reason: str | None = None) -> bytes:
    """A retained state report shaped like the agent's ``snapshot()``."""
    last = None if result is None else {"result": result, "deployment": counter,
                                        "reason": reason}
    return json.dumps({
        "device": device, "fleet": FLEET, "online": online, "ts": time.time(),
        "model": None if version is None else {"name": "adder", "version": version,
                                               "sha256": "ab" * 32},
        "previous": None, "phase": "idle", "deployment": counter or 0,
        "last_update": last, "groups": groups, "hardware": HW, "tags": {"site": "north"},
        "queued_reports": 0, "dropped_reports": 0, "storage": {"ok": True},
    }).encode()


def event(device: str, kind: str, counter: int, version: str, **extra: Any) -> bytes:
    return json.dumps({"device": device, "fleet": FLEET, "event": kind, "ts": time.time(),
                       "deployment": {"counter": counter, "name": "adder",
                                      "artifact_version": version}, **extra}).encode()


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[FleetDB]:
    with FleetDB.open(f"sqlite:///{tmp_path / 'fleet.db'}") as d:
        with d.begin() as c:
            for i in range(3):
                assert ingest_state(c, FLEET, f"cam-{i}", state(f"cam-{i}", "1",
                                                                groups=["cams"]))
            assert ingest_state(c, FLEET, "gate 1 ü", state("gate 1 ü", None,
                                                            groups=["gates"], online=False))
            assert ingest_state(c, "other", "elsewhere", state("elsewhere", "7",
                                                                groups=["cams"]))
            assert ingest_event(c, FLEET, "cam-0", event("cam-0", "downloaded", 5, "2"))
            assert ingest_event(c, FLEET, "cam-0", event(
                "cam-0", "rolled_back", 5, "2", reason="health window: 3 errors"))
            assert not ingest_state(c, FLEET, "cam-9", b"{not json")  # ignored, counted
        # The operator's assignment: what the group and tag filters and selectors use.
        north = AssignmentChange.parse(tags=["site=north"])
        assign_devices(d, fleet=FLEET, actor="tester", changes={
            **{f"cam-{i}": north.merged(AssignmentChange(("cams",))) for i in range(3)},
            "gate 1 ü": north.merged(AssignmentChange(("gates",)))})
        assign_devices(d, fleet="other", actor="tester",
                       changes={"elsewhere": AssignmentChange(("cams",))})
        yield d


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
    assert r["failures"] == [{"device": first, "status": "failed",
                              "reason": "smoke test: NaN"}]
    assert get(api, "/api/audit")[1][-1]["action"] == "rollout.start"
    assert get(FleetApi(db, fleet="other"), f"/api/rollouts/{rid}")[0] == 404


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
    assert b" 501 " in _raw(server, b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")[:40]
    body = _raw(server, b"GET /api/devices HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert b" 413 " in body[:40] and b"no request body" in body
    # A client that sends half a request and stalls is dropped after timeout_s.
    t0 = time.monotonic()
    assert _raw(server, b"GET /api/devices HTTP/1.1\r\nHost") == b""
    assert time.monotonic() - t0 < 4
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


def server_busy(server: WebServer) -> bool:
    return b" 503 " in _raw(server, b"GET /api/devices HTTP/1.1\r\n\r\n")[:40]


def test_serve_refuses_a_public_http_bind_in_one_line(tmp_path, capsys) -> None:
    from edge_sdk.cli import main

    code = main(["serve", "--repo", str(tmp_path), "--db", f"sqlite:///{tmp_path / 'f.db'}",
                 "--broker", "mqtt://127.0.0.1:1", "--http", "0.0.0.0:8700"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--http-allow-remote" in err and "\n" not in err


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
