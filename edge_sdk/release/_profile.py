"""Host side of on-device profiling: publish candidates, ask devices, wait for figures.

:func:`profile_on_devices` signs the candidate files, the sample and the host's
outputs of each candidate as ``profiling/ID/...`` targets in the release
repository (``edge-sdk serve`` must serve it), publishes one signed request
per device on its ``profile/req`` topic, waits for every device's result on
``profile/res`` and removes the targets again, whatever happened. A device
that refuses, fails, or does not answer in time is a :class:`ProfilingError`
naming it; nothing is left in the repository.
"""

from __future__ import annotations

import math
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from .._io import save_npz
from ..errors import ConfigError, DeploymentError, UsageError
from ..profiling import (
    DeviceProfiler,
    FileRef,
    MalformedProfilingResultError,
    ProfileCandidate,
    ProfilingLimits,
    ProfilingRequest,
    ProfilingResult,
    parse_profiling_result,
    sign_profiling_request,
)
from ..profiling._request import MAX_ROUNDS
from ..transport import MqttConfig, MqttConnection, Topics
from ..transport._config import check_topic_word
from ..trust._keys import DEPLOYMENT_ROLE
from ._repository import Repository


class ProfilingError(DeploymentError):
    """A device did not deliver profiling figures: refused, failed or silent."""


@dataclass(frozen=True)
class ProfileConfig:
    """How long to wait and how the devices measure."""

    #: For all devices' results, from the moment the requests are published.
    timeout_s: float = 300.0
    runs: int = 60
    warmup: int = 5
    #: Fresh sessions per candidate on the device (median of their medians).
    rounds: int = 3
    rtol: float = 1e-2
    atol: float = 1e-4

    def __post_init__(self) -> None:
        # Against what a device accepts by default (ProfilingLimits): a request it would
        # refuse is a one-line error here, before anything is signed or published.
        lim = ProfilingLimits()
        ttl = self.timeout_s + _EXPIRY_MARGIN_S
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise UsageError(f"profiling timeout must be > 0 s, not {self.timeout_s:g}")
        if ttl > lim.max_ttl_s:
            raise UsageError(
                f"profiling timeout {self.timeout_s:g} s makes the request valid for "
                f"{ttl:g} s, over the devices' default limit of {lim.max_ttl_s:g} s "
                f"(profiling.max_ttl_s); at most {lim.max_ttl_s - _EXPIRY_MARGIN_S:g} s")
        if not 1 <= self.runs <= lim.max_runs:
            raise UsageError(f"profiling runs must be 1..{lim.max_runs} (the devices' default "
                             f"profiling.max_runs), not {self.runs}")
        if not 0 <= self.warmup <= lim.max_warmup:
            raise UsageError(f"profiling warm-up runs must be 0..{lim.max_warmup} (the "
                             f"devices' default profiling.max_warmup), not {self.warmup}")
        if not 1 <= self.rounds <= MAX_ROUNDS:
            raise UsageError(f"profiling rounds must be 1..{MAX_ROUNDS}, not {self.rounds}")
        for name, tol in (("rtol", self.rtol), ("atol", self.atol)):
            if not (math.isfinite(tol) and 0.0 <= tol <= 1.0):
                raise UsageError(f"profiling {name} must be within 0..1, not {tol:g}")


#: How long past the host's wait a request stays valid (clock skew, broker delay).
_EXPIRY_MARGIN_S = 60.0


def profile_on_devices(
    repo: Repository, connection: MqttConnection, *, devices: Sequence[str],
    candidates: Sequence[tuple[str, Path]], sample: Mapping[str, np.ndarray],
    expected: Mapping[str, Mapping[str, np.ndarray]], config: ProfileConfig | None = None,
    topics: Topics | None = None, spread: Mapping[str, float] | None = None,
) -> dict[str, ProfilingResult]:
    """Time ``candidates`` (name, model file) on each of ``devices``; ``expected`` holds the
    host's outputs of each candidate on ``sample``, ``spread`` how far a candidate's
    outputs may differ between correct runtimes (:attr:`ProfileCandidate.spread`). Returns
    device → its result (status ``done``; a candidate a device excluded has ``error``
    set)."""
    cfg = config or ProfileConfig()
    t = topics or Topics.for_config(connection.config)
    if not devices:
        raise UsageError("name at least one device to profile on")
    for d in devices:
        check_topic_word(d, "device id")
    if not candidates:
        raise UsageError("no candidate to profile")
    signers = repo.keys.signers(DEPLOYMENT_ROLE)
    if not signers:
        raise ConfigError(f"{repo.keys.dir}: no deployment key to sign profiling requests "
                          "(was it made by 'edge-sdk release init'?)")
    rid = secrets.token_hex(16)
    results: dict[str, ProfilingResult] = {}
    bad: dict[str, str] = {}
    got = threading.Condition()

    def on_result(topic: str, payload: bytes) -> None:
        device = next((d for d in devices if t.profile_result(d) == topic), None)
        if device is None:
            return
        try:
            res = parse_profiling_result(payload)
        except MalformedProfilingResultError as err:
            # Kept for the error message, not fatal: the device's real answer may follow.
            with got:
                bad[device] = str(err)
            return
        if res.id != rid or res.device != device:
            return  # an answer to another request (or a stale one)
        if res.status == "refused" and not res.verified:
            # The device refused a payload it could not verify (perhaps a forged copy
            # of this request's id): kept for the error message, the real answer may follow.
            with got:
                bad[device] = f"refused an unverified request: {res.reason or 'no reason'}"
            return
        with got:
            results[device] = res
            got.notify_all()

    with tempfile.TemporaryDirectory(prefix="edge-profile-") as tmp, \
            repo.profiling_run(rid) as run:
        # The run's lock is held from before anything is signed until its targets are
        # removed again; if this process dies, the next change to the repository
        # (another profiling run, `release add`, `release refresh`) removes them.
        work = Path(tmp)
        files = {"sample.npz": _npz(work / "sample.npz", sample)}
        for name, path in candidates:
            files[f"{name}{Path(path).suffix or '.onnx'}"] = Path(path)
            files[f"{name}.expected.npz"] = _npz(work / f"{name}.expected.npz",
                                                  expected[name])
        subs = []
        try:
            signed = run.add_files(files)

            def ref(fname: str) -> FileRef:
                tf = signed[fname]
                return FileRef(tf.path, tf.hashes["sha256"], tf.length)

            cands = tuple(ProfileCandidate(n, ref(f"{n}{Path(p).suffix or '.onnx'}"),
                                           ref(f"{n}.expected.npz"),
                                           (spread or {}).get(n)) for n, p in candidates)
            for d in devices:
                subs.append(connection.subscribe(t.profile_result(d), on_result))
            now = datetime.now(UTC).replace(microsecond=0)
            expires = now + timedelta(seconds=cfg.timeout_s + _EXPIRY_MARGIN_S)
            run.valid_until(expires)
            for d in devices:
                req = ProfilingRequest(
                    fleet=t.fleet, device=d, id=rid, issued=now, expires=expires,
                    sample=ref("sample.npz"), candidates=cands, runs=cfg.runs,
                    warmup=cfg.warmup, rounds=min(cfg.rounds, cfg.runs), rtol=cfg.rtol,
                    atol=cfg.atol)
                connection.publish_wait(t.profile_request(d),
                                        sign_profiling_request(req, signers[:1]), qos=1)
            deadline = time.monotonic() + cfg.timeout_s
            with got:
                while len(results) < len(devices):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    got.wait(min(left, 1.0))
        finally:
            for s in subs:
                s.cancel()
    silent = [d for d in devices if d not in results]
    unreadable = [d for d in silent if d in bad]
    if unreadable:
        d = unreadable[0]
        raise ProfilingError(f"device {d} sent no readable, verified profiling result "
                             f"within {cfg.timeout_s:g} s (last: {bad[d]})")
    if silent:
        raise ProfilingError(
            f"device {', '.join(silent)} did not answer the profiling request within "
            f"{cfg.timeout_s:g} s (is its agent running, and is `edge-sdk serve --repo "
            f"{repo.path}` serving the repository?)")
    for d, res in results.items():
        if res.status != "done":
            raise ProfilingError(f"device {d} {res.status} the profiling request: "
                                 f"{res.reason or 'no reason given'}")
    return results


def _npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    save_npz(path, arrays)
    return path




class RepositoryProfiler(DeviceProfiler):
    """The :class:`~edge_sdk.profiling.DeviceProfiler` of ``convert --profile-on`` and
    ``bench --on``: opens its own broker connection per call and runs
    :func:`profile_on_devices` against the repository at ``repo``."""

    def __init__(self, repo: str | Path, mqtt: MqttConfig, devices: Sequence[str], *,
                 keydir: str | Path | None = None, config: ProfileConfig | None = None,
                 ) -> None:
        self.repo = Repository(repo, keydir)
        self.mqtt = mqtt
        self.devices = tuple(devices)
        self.config = config or ProfileConfig()
        for d in self.devices:
            check_topic_word(d, "device id")

    def __call__(self, candidates: Sequence[tuple[str, Path]], sample: Mapping[str, np.ndarray],
                 expected: Mapping[str, Mapping[str, np.ndarray]], *,
                 spread: Mapping[str, float] | None = None,
                 ) -> dict[str, ProfilingResult]:
        with MqttConnection(self.mqtt, name="edge-profile") as conn:
            return profile_on_devices(self.repo, conn, devices=self.devices,
                                      candidates=candidates, sample=sample,
                                      expected=expected, config=self.config, spread=spread)


__all__ = ["ProfileConfig", "ProfilingError", "RepositoryProfiler", "profile_on_devices"]
