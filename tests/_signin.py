"""Signing in to the fleet page's API as an operator, and posting to it as the page does
(same-origin headers, the session cookie, the CSRF token), for the tests of its actions."""

from __future__ import annotations

import json
from typing import Any

from edge_sdk.fleet._web import FleetApi, Request

PASSWORD = "correct horse battery"
HOST = "127.0.0.1:8700"


def post(api: FleetApi, path: str, doc: Any = None, *, cookie: str | None = None,
         csrf: str | None = None, client: str = "127.0.0.1",
         **headers: str) -> tuple[int, Any, dict[str, str]]:
    h = {"host": HOST, "content-type": "application/json", "origin": f"http://{HOST}",
         "sec-fetch-site": "same-origin"}
    if cookie:
        h["cookie"] = f"theme=dark; edge_session={cookie}"
    if csrf is not None:
        h["x-csrf-token"] = csrf
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    h = {k: v for k, v in h.items() if v}
    body = doc if isinstance(doc, bytes) else json.dumps({} if doc is None else doc).encode()
    ans = api.serve(Request("POST", path, h, body, client))
    return ans.status, json.loads(ans.body), dict(ans.headers)


def sign_in(api: FleetApi, name: str = "alice",
            password: str = PASSWORD) -> tuple[str, str]:
    status, doc, headers = post(api, "/api/login", {"name": name, "password": password})
    assert status == 200, doc
    cookie = headers["Set-Cookie"]
    return cookie.split(";")[0].split("=", 1)[1], doc["csrf"]
