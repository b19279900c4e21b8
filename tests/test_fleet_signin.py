"""Signing in to the fleet page and acting on rollouts from it: operator accounts made by
the CLI, the session cookie, the CSRF token, the backoff after wrong passwords and the
audit log, against a real SQLite fleet database (and the real socket layer)."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from edge_sdk.cli import main
from edge_sdk.fleet import FleetDB, RolloutSpec, start_rollout
from edge_sdk.fleet import _operators as ops
from edge_sdk.fleet._store import load_state, save_state
from edge_sdk.fleet._store._schema import operator_sessions, rollout_commands
from edge_sdk.fleet._web import FleetApi, Request, WebConfig, WebServer
from tests import _fleet_records
from tests._fleet_records import FLEET
from tests._fleetdb import db_url  # noqa: F401  (both engines)
from tests._signin import HOST, PASSWORD, post, sign_in

db = _fleet_records.db  # agent reports and assignments ingested, a fresh one per test

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def awaiting_approval(db: FleetDB) -> int:
    """A rollout the controller held after wave 1, as the controller records it."""
    rid = start_rollout(db, fleet=FLEET, model="adder", version="2",
                        selector={"groups": ["cams"]},
                        spec=RolloutSpec(waves=("1", "100%"), pause_after_wave=True),
                        actor="tester")
    with db.begin() as c:
        st = load_state(c, rid)
        new = load_state(c, rid)
        new.status, new.held, new.wave, new.waves = "paused", True, 1, 2
        save_state(c, new, st)
    return rid


def queued(db: FleetDB, rid: int) -> list[tuple[str, str]]:
    with db.read() as c:
        return [(r.command, r.actor) for r in c.execute(
            sa.select(rollout_commands).where(rollout_commands.c.rollout == rid)
            .order_by(rollout_commands.c.seq))]


@pytest.fixture()
def api(db: FleetDB) -> FleetApi:
    ops.add_operator(db, "alice", PASSWORD, "root")
    return FleetApi(db, fleet=FLEET, throttle=ops.LoginThrottle(clock=Clock()))


def test_a_signed_in_operator_approves_pauses_resumes_and_aborts_audited_by_name(
        db, api) -> None:
    rid = awaiting_approval(db)
    assert api.serve(Request("GET", "/api/session")).body == json.dumps(
        {"operator": None, "csrf": None, "sign_in": True, "why": None},
        separators=(",", ":")).encode()
    cookie, csrf = sign_in(api)
    ans = api.serve(Request("GET", "/api/session", {"cookie": f"edge_session={cookie}"}))
    assert json.loads(ans.body)["operator"] == "alice"
    assert json.loads(ans.body)["csrf"] == csrf
    r = json.loads(api.handle("GET", f"/api/rollouts/{rid}")[2])
    assert r["awaiting_approval"] is True
    for command in ("approve", "pause", "resume"):
        status, doc, _ = post(api, f"/api/rollouts/{rid}/{command}", cookie=cookie, csrf=csrf)
        assert (status, doc) == (202, {"rollout": rid, "command": command, "by": "alice"})
    status, doc, _ = post(api, f"/api/rollouts/{rid}/abort", {"reason": "wrong build"},
                          cookie=cookie, csrf=csrf)
    assert status == 202
    # The controller's queue: approve is the resume of a held rollout.
    assert queued(db, rid) == [("resume", "alice"), ("pause", "alice"), ("resume", "alice"),
                               ("abort", "alice")]
    log = [(a["actor"], a["action"], a["params"]) for a in db.audit(10)
           if a["action"].startswith("rollout.") and a["actor"] == "alice"]
    assert sorted(log, key=str) == sorted([
        ("alice", "rollout.approve", {"rollout": rid, "via": "page"}),
        ("alice", "rollout.pause", {"rollout": rid, "via": "page"}),
        ("alice", "rollout.resume", {"rollout": rid, "via": "page"}),
        ("alice", "rollout.abort", {"rollout": rid, "via": "page", "reason": "wrong build"}),
    ], key=str)
    assert any(a["action"] == "operator.login" and a["actor"] == "alice"
               for a in db.audit(20))
    # A command that does not apply is the controller's refusal, as in the CLI.
    status, doc, _ = post(api, f"/api/rollouts/{rid}/abort", cookie=cookie, csrf=csrf)
    assert status == 409 and "already aborting" in doc["error"]
    # Signing out ends the session on the server, not only in the browser.
    status, _, headers = post(api, "/api/logout", cookie=cookie, csrf=csrf)
    assert status == 200 and "Max-Age=0" in headers["Set-Cookie"]
    assert post(api, f"/api/rollouts/{rid}/pause", cookie=cookie, csrf=csrf)[0] == 401


def test_approve_applies_only_to_a_rollout_waiting_for_approval(db, api) -> None:
    rid = start_rollout(db, fleet=FLEET, model="adder", version="2",
                        selector={"groups": ["cams"]}, spec=RolloutSpec(waves=("100%",)),
                        actor="tester")
    cookie, csrf = sign_in(api)
    status, doc, _ = post(api, f"/api/rollouts/{rid}/approve", cookie=cookie, csrf=csrf)
    assert status == 409 and "not waiting for approval" in doc["error"]
    assert main(["rollout", "approve", str(rid), "--db", db.url]) == 2
    assert queued(db, rid) == []
    assert post(api, "/api/rollouts/999/pause", cookie=cookie, csrf=csrf)[0] == 404
    other = FleetApi(db, fleet="other")
    cookie2, csrf2 = sign_in(other)
    assert post(other, f"/api/rollouts/{rid}/pause", cookie=cookie2, csrf=csrf2)[0] == 404


def test_an_action_needs_a_session_and_its_csrf_token_from_the_page_itself(db, api) -> None:
    rid = awaiting_approval(db)
    path = f"/api/rollouts/{rid}/approve"
    status, doc, _ = post(api, path)
    assert status == 401 and "sign in" in doc["error"]
    assert post(api, path, cookie="x" * 43, csrf="y")[0] == 401  # no such session
    cookie, csrf = sign_in(api)
    assert post(api, path, cookie=cookie)[0] == 403  # no token
    status, doc, _ = post(api, path, cookie=cookie, csrf=csrf[:-1] + "0"
                          if csrf[-1] != "0" else csrf[:-1] + "1")
    assert status == 403 and "X-CSRF-Token" in doc["error"]
    # Another site's form or script, even one that somehow had the token.
    assert post(api, path, cookie=cookie, csrf=csrf, sec_fetch_site="cross-site")[0] == 403
    assert post(api, path, cookie=cookie, csrf=csrf, sec_fetch_site="same-site")[0] == 403
    status, doc, _ = post(api, path, cookie=cookie, csrf=csrf, origin="http://evil.test")
    assert status == 403 and "Origin" in doc["error"]
    assert queued(db, rid) == []
    # A client without Origin and Sec-Fetch-Site (curl) with cookie and token may act.
    assert post(api, path, cookie=cookie, csrf=csrf, origin="", sec_fetch_site="")[0] == 202


def test_wrong_passwords_back_off_per_account_and_per_address_with_429(db) -> None:
    ops.add_operator(db, "alice", PASSWORD, "root")
    clock = Clock()
    api = FleetApi(db, fleet=FLEET, throttle=ops.LoginThrottle(free=3, base_s=2,
                                                              max_s=60, clock=clock))
    wrong = {"name": "alice", "password": "not it at all"}
    unknown = post(api, "/api/login", {"name": "mallory", "password": "not it at all"},
                   client="10.0.0.9")
    first = post(api, "/api/login", wrong)
    assert unknown[:2] == first[:2] == (401, {"error": "wrong name or password"})
    post(api, "/api/login", wrong)
    post(api, "/api/login", wrong)  # the third free one; the fourth locks for 2 s
    assert post(api, "/api/login", wrong)[0] == 401
    status, doc, headers = post(api, "/api/login", {"name": "alice", "password": PASSWORD})
    assert (status, headers["Retry-After"]) == (429, "2") and "try again" in doc["error"]
    # The account is locked from every address.
    assert post(api, "/api/login", {"name": "alice", "password": PASSWORD},
                client="10.0.0.7")[0] == 429
    clock.now += 2
    assert post(api, "/api/login", wrong)[0] == 401  # the fifth: locked for 4 s
    assert post(api, "/api/login", wrong)[2]["Retry-After"] == "4"
    clock.now += 4
    sign_in(api)  # a right password after the window
    # One address trying many names is held too.
    for n in range(4):
        post(api, "/api/login", {"name": f"guess{n}", "password": "x" * 9},
             client="10.0.0.8")
    assert post(api, "/api/login", {"name": "alice", "password": PASSWORD},
                client="10.0.0.8")[0] == 429
    assert post(api, "/api/login", {"name": "alice", "password": PASSWORD},
                client="10.0.0.6")[0] == 200


def test_sign_in_on_a_plain_http_network_address_needs_a_tls_proxy_in_front(db) -> None:
    ops.add_operator(db, "alice", PASSWORD, "root")
    plain = FleetApi(db, config=WebConfig(host="0.0.0.0", allow_remote=True))
    status, doc, _ = post(plain, "/api/login", {"name": "alice", "password": PASSWORD})
    assert status == 403 and "--http-behind-tls-proxy" in doc["error"]
    assert json.loads(plain.handle("GET", "/api/session")[2])["sign_in"] is False
    proxied = FleetApi(db, config=WebConfig(host="0.0.0.0", allow_remote=True,
                                            behind_tls_proxy=True))
    _, _, headers = post(proxied, "/api/login", {"name": "alice", "password": PASSWORD},
                         origin=f"https://{HOST}")
    assert headers["Set-Cookie"].endswith("; HttpOnly; SameSite=Strict; Secure")
    local = post(FleetApi(db), "/api/login", {"name": "alice", "password": PASSWORD})
    assert local[2]["Set-Cookie"].endswith("; HttpOnly; SameSite=Strict")


def test_a_session_ends_when_its_operator_is_removed_repassworded_or_idle(db, api) -> None:
    rid = awaiting_approval(db)
    path = f"/api/rollouts/{rid}/pause"
    cookie, csrf = sign_in(api)
    ops.set_password(db, "alice", "a new password", "root")
    assert post(api, path, cookie=cookie, csrf=csrf)[0] == 401
    cookie, csrf = sign_in(api, password="a new password")
    with db.begin() as c:
        c.execute(operator_sessions.update().values(
            last_used=time.time() - api.config.session_idle_s - 1))
    assert post(api, path, cookie=cookie, csrf=csrf)[0] == 401
    cookie, csrf = sign_in(api, password="a new password")
    ops.remove_operator(db, "alice", "root")
    assert post(api, path, cookie=cookie, csrf=csrf)[0] == 401
    assert queued(db, rid) == []


def test_a_post_must_be_a_small_json_object(db, api) -> None:
    assert post(api, "/api/login", {"name": "alice"})[0] == 400
    assert post(api, "/api/login", b"[1]")[0] == 400
    assert post(api, "/api/login", b"\xff")[0] == 400
    status, doc, _ = post(api, "/api/login", {"name": "alice", "password": PASSWORD},
                          content_type="text/plain")
    assert status == 415 and "application/json" in doc["error"]
    status, doc, _ = post(api, "/api/login", b"{" + b" " * 5000 + b"}")
    assert status == 413 and "max_body_bytes" in doc["error"]
    cookie, csrf = sign_in(api)
    rid = awaiting_approval(db)
    status, doc, _ = post(api, f"/api/rollouts/{rid}/pause", {"reason": "x"}, cookie=cookie,
                          csrf=csrf)
    assert status == 400 and "takes {}" in doc["error"]
    assert api.handle("GET", f"/api/rollouts/{rid}/pause")[0] == 405
    assert post(api, "/api/devices")[0] == 405


def _raw(server: WebServer, data: bytes) -> tuple[int, dict[str, str], bytes]:
    port = int(server._server.server_address[1])  # noqa: SLF001
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock, method="POST")
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_the_socket_layer_takes_a_bounded_post_with_content_length_only(db, api) -> None:
    ops.add_operator(db, "bob", PASSWORD, "root")
    with WebServer(db, fleet=FLEET) as server:
        port = int(server._server.server_address[1])  # noqa: SLF001
        body = json.dumps({"name": "bob", "password": PASSWORD}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/api/login", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["operator"] == "bob"
        cookie = resp.getheader("Set-Cookie") or ""
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # Keep-alive: the next request on the connection after a body is read as one.
        conn.request("GET", "/api/session",
                     headers={"Cookie": cookie.split(";")[0]})
        assert json.loads(conn.getresponse().read())["operator"] == "bob"
        conn.close()
        head = b"POST /api/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        assert _raw(server, head + b"\r\n")[0] == 411
        assert _raw(server, head + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                    )[0] == 411
        status, _, data = _raw(server, head + b"Content-Length: 99999\r\n\r\n{}")
        assert status == 413 and b"max_body_bytes" in data
        assert _raw(server, b"PUT /api/login HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0] == 405


def test_operator_add_takes_the_password_from_stdin_and_signs_in_with_it(
        db, monkeypatch, capsys) -> None:
    url = db.url
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PASSWORD}\n"))
    assert main(["operator", "add", "carol", "--db", url, "--password-stdin",
                 "--operator", "root"]) == 0
    assert ops.authenticate(db, "carol", PASSWORD)
    assert not ops.authenticate(db, "carol", PASSWORD + "x")
    with db.read() as c:
        stored = c.execute(sa.text("SELECT hash FROM operators WHERE name='carol'")).scalar()
    assert stored.startswith("scrypt$") and PASSWORD not in stored
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PASSWORD}\n"))
    assert main(["operator", "add", "carol", "--db", url, "--password-stdin"]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["operator", "add", "dave", "--db", url, "--password-stdin"]) == 2
    assert main(["operator", "add", "no spaces", "--db", url, "--password-stdin"]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "8..1024" in err and "letters, digits" in err
    assert "Traceback" not in err
    assert main(["operator", "list", "--db", url]) == 0
    assert "carol" in capsys.readouterr().out
    assert main(["operator", "remove", "carol", "--db", url, "--operator", "root"]) == 0
    assert not ops.authenticate(db, "carol", PASSWORD)
    assert [a["action"] for a in db.audit(10) if a["actor"] == "root"][:2] in (
        ["operator.add", "operator.remove"], ["operator.remove", "operator.add"])


def test_accounts_and_sessions_work_alike_on_sqlite_and_postgresql(db_url) -> None:  # noqa: F811
    with FleetDB.open(db_url) as db:
        api = FleetApi(db)
        assert json.loads(api.handle("GET", "/api/session")[2])["sign_in"] is False
        ops.add_operator(db, "erin", PASSWORD, "root")
        ops.add_operator(db, "frank", PASSWORD, "root")
        cookie = sign_in(api, "erin")[0]
        sign_in(api, "frank")
        assert [(o["name"], o["sessions"], o["disabled"]) for o in ops.list_operators(db)] \
            == [("erin", 1, False), ("frank", 1, False)]
        ops.set_disabled(db, "erin", True, "root")
        assert post(api, "/api/login", {"name": "erin", "password": PASSWORD})[0] == 401
        ans = api.serve(Request("GET", "/api/session", {"cookie": f"edge_session={cookie}"}))
        assert json.loads(ans.body)["operator"] is None
        ops.set_disabled(db, "erin", False, "root")
        sign_in(api, "erin")
        with db.read() as c:
            ids = c.execute(sa.select(operator_sessions.c.id)).scalars().all()
        assert len(ids) == 2 and cookie not in ids and all(len(i) == 64 for i in ids)


# -- what a hostile client sends (each refusal a one-line JSON 4xx, never a 500) -----------

def _post_raw(server: WebServer, path: str, body: bytes,
              extra: str = "") -> tuple[int, dict[str, str], bytes]:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode()
    return _raw(server, head + body)


def test_a_lone_surrogate_name_escaped_in_json_is_a_wrong_password_not_a_500(
        db, api) -> None:
    # "\ud800" is valid JSON, but no database driver can encode the string it decodes to.
    with WebServer(db, fleet=FLEET) as server:
        for doc in (b'{"name": "\\ud800", "password": "long enough"}',
                    b'{"name": "alice", "password": "\\udfff long enough"}'):
            status, _, data = _post_raw(server, "/api/login", doc)
            assert (status, json.loads(data)) == (401, {"error": "wrong name or password"})
        sign_in(api)  # the address took three free failures; the account still works


def test_a_json_body_nested_deeper_than_the_decoder_is_a_400_not_a_500(db, api) -> None:
    with WebServer(db, fleet=FLEET) as server:
        status, _, data = _post_raw(server, "/api/login", b"[" * 2000 + b"]" * 2000)
    assert status == 400 and json.loads(data) == {
        "error": "the request body is JSON nested too deep"}


def test_a_cookie_or_csrf_token_outside_ascii_is_refused_not_a_500(db, api) -> None:
    # The socket decodes headers as Latin-1; a FleetApi caller may pass any str.
    rid = awaiting_approval(db)
    cookie, csrf = sign_in(api)
    for bad in (cookie[:-1] + "\ud800", cookie[:-1] + "€"):
        ans = api.serve(Request("GET", "/api/session", {"cookie": f"edge_session={bad}"}))
        assert ans.status == 200 and json.loads(ans.body)["operator"] is None
    status, doc, _ = post(api, f"/api/rollouts/{rid}/pause", cookie=cookie, csrf=csrf + "€")
    assert status == 403 and "X-CSRF-Token" in doc["error"]
    assert queued(db, rid) == []


def test_an_action_on_a_missing_rollout_names_neither_the_database_nor_a_fleet(
        db, api) -> None:
    cookie, csrf = sign_in(api)
    status, doc, _ = post(api, "/api/rollouts/999999999999/abort", cookie=cookie, csrf=csrf)
    assert (status, doc) == (404, {"error": f"no rollout 999999999999 in fleet {FLEET!r}"})
    assert json.loads(api.handle("GET", "/api/rollouts/424242")[2]) == {
        "error": f"no rollout 424242 in fleet {FLEET!r}"}


def test_a_flood_of_new_names_does_not_push_a_locked_account_out_of_the_backoff(
        db) -> None:
    ops.add_operator(db, "alice", PASSWORD, "root")
    api = FleetApi(db, fleet=FLEET, throttle=ops.LoginThrottle(
        free=1, base_s=60, max_s=60, max_keys=6, clock=Clock()))
    wrong = {"name": "alice", "password": "not it at all"}
    post(api, "/api/login", wrong, client="10.0.0.1")
    assert post(api, "/api/login", wrong, client="10.0.0.2")[0] == 401  # locks alice
    # Each new address tries one new name: never locked, each a new key in the table.
    for n in range(8):
        assert post(api, "/api/login", {"name": f"guess{n}", "password": "x" * 9},
                    client=f"10.0.1.{n}")[0] == 401
    assert len(api.throttle._keys) <= 6  # noqa: SLF001  (the bound still holds)
    assert post(api, "/api/login", {"name": "alice", "password": PASSWORD},
                client="10.0.2.1")[0] == 429


def test_wrong_passwords_sent_in_parallel_cannot_outrun_the_backoff(db) -> None:
    ops.add_operator(db, "alice", PASSWORD, "root")
    with WebServer(db, fleet=FLEET, config=WebConfig(
            port=0, login_free_failures=0, login_backoff_s=60, login_concurrency=2)) as server:
        body = json.dumps({"name": "alice", "password": "not it at all"}).encode()
        statuses: list[int] = []
        gate = threading.Barrier(6)

        def guess() -> None:
            gate.wait(10)
            statuses.append(_post_raw(server, "/api/login", body)[0])

        threads = [threading.Thread(target=guess) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    # free=0: the first wrong password locks; the checks running beside it (at most
    # login_concurrency) are all that can get through.
    assert statuses.count(401) <= 2
    assert len(statuses) == 6 and set(statuses) <= {401, 429}


def test_a_sqlite_database_holding_password_hashes_is_not_readable_by_other_users(
        db, monkeypatch) -> None:
    path = Path(db.url.removeprefix("sqlite:///"))
    for p in (path, Path(f"{path}-wal")):
        p.chmod(0o644)  # as a umask of 022 leaves it
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PASSWORD}\n"))
    assert main(["operator", "add", "carol", "--db", db.url, "--password-stdin"]) == 0
    for p in (path, Path(f"{path}-wal")):
        assert p.stat().st_mode & 0o777 == 0o600, p
    path.chmod(0o640)
    ops.set_password(db, "carol", "another password", "root")
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_rollout_id_beyond_the_id_column_is_a_404_not_a_database_outage(
        db_url) -> None:  # noqa: F811
    with FleetDB.open(db_url) as d:
        ops.add_operator(d, "alice", PASSWORD, "root")
        api = FleetApi(d, fleet=FLEET, throttle=ops.LoginThrottle(clock=Clock()))
        # A NUL is valid JSON and a 503 from PostgreSQL's driver if looked up.
        assert post(api, "/api/login", {"name": "ali\x00ce", "password": PASSWORD})[:2] == (
            401, {"error": "wrong name or password"})
        cookie, csrf = sign_in(api)
        for rid in (2**31 - 1, 2**31, 999999999999):
            want = {"error": f"no rollout {rid} in fleet {FLEET!r}"}
            assert post(api, f"/api/rollouts/{rid}/abort", cookie=cookie,
                        csrf=csrf)[:2] == (404, want)
            status, _, body = api.handle("GET", f"/api/rollouts/{rid}")
            assert (status, json.loads(body)) == (404, want)


def test_the_cli_answers_a_rollout_id_beyond_the_id_column_in_one_line(
        db_url, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    from edge_sdk.cli import main

    with FleetDB.open(db_url):
        pass
    for argv in (["rollout", "abort", "9999999999"], ["rollout", "status", "9999999999"],
                 ["rollout", "approve", str(2**31)]):
        assert main([*argv, "--db", db_url]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("edge-sdk: error: no rollout "), err
