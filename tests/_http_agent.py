"""A real agent serving one model over HTTP, for the endpoint's tests."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from device_agent import Agent
from edge_sdk import build_artifact
from tests._agent_local import LocalSource, config, deployment


@contextmanager
def serving(tmp: Path, model: Path, name: str, sample: dict[str, np.ndarray], *,
            wait_commit: bool = True, **sections: Any) -> Iterator[Agent]:
    """An agent (``connect=False``) with ``model`` installed as version 1."""
    art = build_artifact(model, tmp / name, name=name, version="1", sample=sample)
    sections.setdefault("http", {})
    sections["http"] = {"port": 0, **sections["http"]}
    a = Agent(config(tmp / "state", **sections), source=LocalSource(), connect=False)
    a.start()
    try:
        a.submit(deployment(art, 1))
        wait_for(lambda: a.slots.current is not None, "the model to be swapped in")
        if wait_commit:
            wait_for(lambda: a.installer.state.phase == "committed", "the install to commit")
        yield a
    finally:
        a.stop()


def wait_for(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    """One request on a fresh connection: (status, JSON or raw body, headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    if hdrs.get("content-type", "").startswith("application/json") and raw:
        return resp.status, json.loads(raw), hdrs
    return resp.status, raw, hdrs


def metric(agent: Agent, name: str, **labels: str) -> float:
    value = agent.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send ``raw`` on a new connection; return all the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with suppress(OSError):
            s.sendall(raw)
        return read_until_closed(s)


def read_until_closed(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return out
        if not data:
            return out
        out += data


def error_of(response: bytes) -> tuple[int, str]:
    """(status, error message) of one raw JSON error response."""
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"] if body else ""
