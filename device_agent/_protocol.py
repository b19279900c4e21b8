"""The Open Inference Protocol (KServe v2) routes, independent of any socket.

Routes: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``/v2/models/{name}/infer``, and Triton's extensions
tritonclient calls: ``/v2/models/{name}/config``, ``/v2/models/{name}/stats``,
``/v2/models/stats``, ``/v2/repository/index`` (model routes also under
``/versions/{v}``); ``/metrics`` (Prometheus). Infer bodies may be sent with
``Content-Encoding: gzip`` or ``deflate``.

Several models: every model in :class:`ModelSlots` answers under its name; a request
reads its model from the slots once (a swap of one model never touches a request to
another). The agent tells which models it should serve (``wanted``: its installed
state's models): one that does not serve is listed UNAVAILABLE in the repository index
with why, answers 503 under its name, and keeps ``/v2/health/ready`` at 503.

Answers, not only tensors: an output requested with ``"parameters": {"classification":
K}`` comes back as Triton's classification extension has it (BYTES ``"score:index:label"``,
the top K along the last axis, labels from the manifest); an artifact converted with
``--preprocess image:...`` and ``--postprocess`` also takes a raw JPEG/PNG body
(``Content-Type: image/jpeg`` or ``image/png``) and answers JSON in its task's terms
(labels, boxes, class map, embedding). Its pixel count is checked against
``http.max_image_pixels`` from its header, before decoding (413).

:meth:`InferenceApp.handle` takes a method, a path, lower-cased headers and a
body and returns (status, content type, body, extra headers), so the whole
protocol is testable without a server.

A request the client got wrong is answered 4xx with ``{"error": "..."}`` that
says what was expected. A request that fits the signature but fails in the runtime is
422 (the model cannot run this input), except in a health window when the version the
model replaced runs it: that failure is the new model's, 500 (see ``_serving.Trial``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from edge_sdk import __version__
from edge_sdk._internal import ImageTask, ImageTooLarge, NoImageDecoder, decode_image
from edge_sdk.errors import InputError

from ._budget import Budget
from ._codec import (
    HttpError,
    _short,
    datatype_of,
    decode_tensor,
    decompress,
    encode_response,
    is_decimal,
    split_body,
)
from ._config import HttpConfig
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._metrics import Metrics
from ._serving import READY, ModelSlots, ModelState, Served, Wanted, model_states
from ._tap import Taps

log = logging.getLogger("device_agent.http")

_PLATFORM = {"onnx": "onnxruntime_onnx", "ort": "onnxruntime_onnx", "tflite": "tensorflow_lite"}
_JSON = "application/json"
#: Peak memory of a request per byte of its JSON part (Python lists and floats, the
#: arrays, the JSON answer) and per byte of binary tensor data. Measured on a 13.7 MiB
#: JSON infer: 3.6x in Python allocations, +88 MiB (6.4x) in the agent's peak RSS.
_JSON_COST = 6
_BINARY_COST = 2
#: Peak memory of an image body per decoded pixel: Pillow's 4-byte pixels, the RGB array,
#: and a segmenter's int64 class map at the image's size with its base64 answer.
_PIXEL_COST = 16
_IMAGE_TYPES = ("image/jpeg", "image/png")
#: Statistics kept of model versions no longer served (Triton's stats of a version
#: swapped out a moment ago are still asked for).
_OLD_STATS = 4


class InferenceApp:
    """The protocol logic, independent of the socket layer.

    ``wanted``: the models the device should serve (the agent's installed state), asked
    for the repository index, readiness and the answer to a model that does not serve;
    by default, the models that serve."""

    def __init__(self, slots: ModelSlots, metrics: Metrics, config: HttpConfig,
                 wanted: Callable[[], Iterable[Wanted]] | None = None,
                 taps: Taps | None = None, *,
                 shadow: Callable[[str], dict[str, Any] | None] | None = None) -> None:
        self.slots = slots
        #: What watches answered requests (shadow runs, drift, samples); see _tap.py.
        self.taps = taps if taps is not None else Taps()
        #: The shadow run comparing with a model (``GET /v2/models/{name}/shadow``).
        self._shadow = shadow
        self.metrics = metrics
        self.config = config
        self._wanted = wanted
        self._sem = threading.BoundedSemaphore(config.max_inflight)
        #: Memory that requests being decoded, run and encoded have reserved.
        self.decoding = Budget(config.max_decode_bytes)
        self._stats: dict[tuple[str, str], _ModelStats] = {}
        self._stats_lock = threading.Lock()

    # -- dispatch ------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        """Return (status, content type, body, extra headers). ``headers`` has lower-case
        names."""
        try:
            status, ctype, payload, extra = self._route(method, path, headers, body)
        except HttpError as err:
            status, ctype, extra = err.status, _JSON, {}
            payload = json.dumps({"error": str(err)}).encode()
        except Exception as err:  # a bug must not take the server down
            log.error("internal error on %s %s: %s: %s", method, path[:200],
                      type(err).__name__, err)
            log.debug("traceback", exc_info=True)
            status, ctype, extra = 500, _JSON, {}
            payload = json.dumps({"error": f"internal error: {type(err).__name__}"}).encode()
        if status >= 400:
            # The one place every error answer of the protocol is counted, 5xx included.
            self.metrics.errors.labels(str(status)).inc()
        return status, ctype, payload, extra

    def _route(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        path = path.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["v2"]:
            return self._v2(method, parts[1:], headers, body)
        if parts == ["metrics"] and method == "GET":
            return 200, METRICS_CONTENT_TYPE, self.metrics.render(), {}
        raise HttpError(404, f"no route {method} {path[:200]} (see /v2/health/ready, "
                             "/v2/models/{name}/infer, /metrics)")

    def _v2(self, method: str, parts: list[str], headers: Mapping[str, str],
            body: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        if not parts:
            _method(method, "GET")
            return _ok({"name": "edge-sdk-agent", "version": __version__,
                        "extensions": ["binary_tensor_data", "classification"]})
        if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
            _method(method, "GET")
            if parts[1] == "ready":
                self._check_ready()
            return 200, _JSON, b"", {}
        if parts == ["repository", "index"]:
            _method(method, "POST")
            return _ok([{"name": s.name, "version": s.version, "state": s.state,
                         **({"reason": s.reason} if s.reason else {})}
                        for s in self.states()])
        if parts == ["models", "stats"]:
            _method(method, "GET")
            every = self.slots.all()
            return _ok({"model_stats": [self._model_stats(every[n]) for n in sorted(every)]})
        if parts[0] != "models" or len(parts) < 2:
            raise HttpError(404, f"no route /v2/{'/'.join(parts)}")
        name, rest = parts[1], parts[2:]
        if rest == ["shadow"]:
            _method(method, "GET")
            run = self._shadow(name) if self._shadow is not None else None
            if run is None:
                raise HttpError(404, f"no shadow run compares with model "
                                     f"'{_short_name(name)}'")
            return _ok(run)
        version: str | None = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                raise HttpError(404, "missing version after /versions/")
            version, rest = rest[1], rest[2:]
        served = self._model(name, version)
        if not rest:
            _method(method, "GET")
            return _ok(self._metadata(served))
        if rest == ["ready"]:
            _method(method, "GET")
            return 200, _JSON, b"", {}
        if rest == ["infer"]:
            _method(method, "POST")
            return self._infer(served, headers, body)
        if rest == ["config"]:
            _method(method, "GET")
            return _ok(_triton_config(served))
        if rest == ["stats"]:
            _method(method, "GET")
            return _ok({"model_stats": [self._model_stats(served)]})
        raise HttpError(404, f"no route /v2/models/{name}/{'/'.join(rest)}")

    def states(self) -> list[ModelState]:
        """Every model that serves or should, sorted by name (the repository index)."""
        return model_states(self.slots.all(), self._wanted() if self._wanted else ())

    def _check_ready(self) -> None:
        states = self.states()
        if not states:
            raise HttpError(503, "no model installed yet")
        down = [s for s in states if s.state != READY]
        if down:
            raise HttpError(503, "not serving " + "; ".join(
                f"model '{s.name}' version {s.version}: {s.reason}" for s in down))

    def _model(self, name: str, version: str | None) -> Served:
        # The one read of the slots for this request: what it answers with.
        served = self.slots.get(name)
        if served is None:
            self._missing(name)
        assert served is not None
        if version is not None and version != served.version:
            raise HttpError(404, f"model '{name}' version '{version}' is not served; the "
                                 f"current version is '{served.version}'")
        return served

    def _missing(self, name: str) -> None:
        """Raise the answer to a request for a model that does not serve: 503 for one
        the device should serve (with why it does not), else 404 naming those that do."""
        states = self.states()
        for s in states:
            if s.name == name and s.state != READY:
                raise HttpError(503, f"model '{name}' version {s.version} is not available: "
                                     f"{s.reason}")
        if not states:
            raise HttpError(404, f"model '{_short_name(name)}' is not available: no model "
                                 "installed yet")
        serving = [s.name for s in states if s.state == READY]
        raise HttpError(404, f"unknown model '{_short_name(name)}'; this agent serves "
                             + (", ".join(f"'{n}'" for n in serving) or "no model now"))

    def _metadata(self, served: Served) -> dict[str, Any]:
        p = served.predictor

        def spec(s: Any) -> dict[str, Any]:
            return {"name": s.name, "datatype": datatype_of(s.dtype),
                    "shape": [d if isinstance(d, int) else -1 for d in s.shape]}

        return {"name": served.name, "versions": [served.version],
                "platform": _PLATFORM.get(p.format, p.format),
                "inputs": [spec(s) for s in p.inputs], "outputs": [spec(s) for s in p.outputs]}

    # -- infer ---------------------------------------------------------------------------

    def _model_stats(self, served: Served) -> dict[str, Any]:
        """Triton's statistics of the served model version."""
        return self._stats_for(served).triton(served.name, served.version)

    def _infer(self, served: Served, headers: Mapping[str, str],
               body: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        series = self.metrics.model(served.name)
        ok_c, bad_c, hist = series.ok, series.bad_request, series.latency
        if not self._sem.acquire(timeout=self.config.queue_timeout_s):
            bad_c.inc()
            raise HttpError(429, f"more than {self.config.max_inflight} requests in flight for "
                                 f"{self.config.queue_timeout_s:g} s; retry later")
        t0 = time.perf_counter()
        cost = 0
        stats = self._stats_for(served)
        try:
            try:
                body = decompress(headers.get("content-encoding", ""), body,
                                  self.config.max_body_bytes)
                media = _media_type(headers)
                image = media in _IMAGE_TYPES
                if not image and media.startswith("image/"):
                    raise HttpError(415, f"image bodies are {' or '.join(_IMAGE_TYPES)}, "
                                         f"not {media[:60]}")
                if image:
                    task = _image_task(served)
                    reserved: list[int] = []
                    feed = self._decode_image(task, body, reserved)
                    cost = reserved[0] if reserved else 0
                else:
                    cost = self._reserve_decoding(headers, body)
                t1 = time.perf_counter()
                if not image:
                    request, blobs = split_body(headers, body)
                    feed, binary_out, wanted, req_id, classes = self._decode(served, request,
                                                                             blobs)
                t2 = time.perf_counter()
                try:
                    outputs = served.predict(feed, count_failure=False)
                except InputError as err:
                    raise HttpError(400, str(err)) from err
                except Exception as err:
                    stats.fail(time.perf_counter() - t0)
                    return self._failed(served, feed, err)
                if self.taps:
                    self.taps.served(served, feed, outputs, time.perf_counter() - t2)
                if not image and classes:
                    outputs = _classified(served, outputs, classes)
                t3 = time.perf_counter()
            except HttpError:
                bad_c.inc()
                stats.fail(time.perf_counter() - t0)
                raise
            if image:
                answer = task.answers(outputs, 1)[0]
                result = _ok({"model_name": served.name, "model_version": served.version,
                              **answer.to_json(task.labels)})
            else:
                result = encode_response(served.name, served.version, outputs, binary_out,
                                         wanted, req_id)
            t4 = time.perf_counter()
            hist.observe(t4 - t0)
            ok_c.inc()
            stats.success(t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3)
            return result
        finally:
            self.decoding.release(cost)
            self._sem.release()

    def _failed(self, served: Served, feed: Mapping[str, np.ndarray],
                err: Exception) -> tuple[int, str, bytes, dict[str, str]]:
        """Answer a request that fits the signature but failed in the runtime: 500 when
        the new model in its health window introduced the failure (the previous version
        runs this input), else 422: the model cannot run this input."""
        verdict = served.blame(feed, err)
        if verdict.kind != "no_trial":
            self.metrics.trial_failures.labels(verdict.kind).inc()
        what = " ".join(f"{type(err).__name__}: {err}".split())
        if len(what) > 1000:
            what = what[:997] + "..."
        if verdict.counted:
            self.metrics.model(served.name).error.inc()
            log.error("model %s failed on a request (%s): %s", served.record.label(),
                      verdict.note, what)
            msg = (f"model '{served.name}' version {served.version} failed: {what} "
                   f"({verdict.note}; counted against version {served.version} in its "
                   "health window)")
            return 500, _JSON, json.dumps({"error": msg}).encode(), {}
        self.metrics.model(served.name).cannot_run.inc()
        # The client's doing, counted in the metrics: a flood of them must not flood the log.
        log.debug("model %s cannot run a request: %s%s", served.record.label(), what,
                  f" ({verdict.note})" if verdict.note else "")
        msg = f"the model cannot run this input: {what}"
        if verdict.note:
            msg += f" ({verdict.note})"
        return 422, _JSON, json.dumps({"error": msg}).encode(), {}

    def _stats_for(self, served: Served) -> _ModelStats:
        key = (served.name, served.version)
        st = self._stats.get(key)
        if st is None:
            with self._stats_lock:
                st = self._stats.setdefault(key, _ModelStats())
                # Bounded: the versions that serve, and a few swapped out lately.
                now = self.slots.all()
                gone = [k for k in self._stats if k != key and (
                    k[0] not in now or now[k[0]].version != k[1])]
                for k in gone[:max(0, len(gone) - _OLD_STATS)]:
                    del self._stats[k]
        return st

    def _reserve_decoding(self, headers: Mapping[str, str], body: bytes) -> int:
        """Reserve the memory decoding ``body`` takes from :attr:`decoding`; return it."""
        hlen = headers.get("inference-header-content-length", "")
        n_json = min(int(hlen), len(body)) if is_decimal(hlen) else len(body)
        cost = _JSON_COST * n_json + _BINARY_COST * (len(body) - n_json)
        limit = self.config.max_decode_bytes
        if cost > limit:
            raise HttpError(413, f"decoding this request takes about {cost >> 20} MiB, over "
                                 f"http.max_decode_bytes ({limit >> 20} MiB); send large "
                                 "tensors with the binary extension")
        if not self.decoding.acquire(cost, self.config.queue_timeout_s):
            raise HttpError(503, f"requests being decoded at once need more than "
                                 f"http.max_decode_bytes ({limit >> 20} MiB) for "
                                 f"{self.config.queue_timeout_s:g} s; retry later")
        return cost


    def _decode_image(self, task: ImageTask, body: bytes,
                      reserved: list[int]) -> dict[str, np.ndarray]:
        """The feed of an image body; the memory decoding it takes, reserved from
        :attr:`decoding` once its header told its size, is appended to ``reserved``."""
        limit = self.config.max_decode_bytes

        def reserve(width: int, height: int) -> None:
            cost = len(body) + _PIXEL_COST * width * height
            if cost > limit:
                raise HttpError(413, f"decoding this {width}x{height} image takes about "
                                     f"{cost >> 20} MiB, over http.max_decode_bytes "
                                     f"({limit >> 20} MiB)")
            if not self.decoding.acquire(cost, self.config.queue_timeout_s):
                raise HttpError(503, f"requests being decoded at once need more than "
                                     f"http.max_decode_bytes ({limit >> 20} MiB) for "
                                     f"{self.config.queue_timeout_s:g} s; retry later")
            reserved.append(cost)

        try:
            img = decode_image(body, max_pixels=self.config.max_image_pixels, before=reserve)
        except ImageTooLarge as err:
            raise HttpError(413, f"image of {err.width}x{err.height} = "
                                 f"{err.width * err.height} pixels is over "
                                 f"http.max_image_pixels ({err.limit}); it was not decoded"
                            ) from err
        except NoImageDecoder as err:
            raise HttpError(501, f"this agent cannot decode image bodies: {err}") from err
        except InputError as err:
            raise HttpError(400, str(err)) from err
        try:
            return task.feed(img)[0]
        except InputError as err:
            raise HttpError(400, str(err)) from err

    def _decode(self, served: Served, request: Any,
                blobs: bytes) -> tuple[dict[str, np.ndarray], bool, list[tuple[str, bool]] | None,
                                       Any, dict[str, int]]:
        if not isinstance(request, dict):
            raise HttpError(400, "request body must be a JSON object with an 'inputs' list")
        inputs = request.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise HttpError(400, "request needs a non-empty 'inputs' list of "
                                 "{name, shape, datatype, data}")
        params = request.get("parameters") or {}
        if not isinstance(params, dict):
            raise HttpError(400, "'parameters' must be an object")
        specs = {s.name: s for s in served.predictor.inputs}
        feed: dict[str, np.ndarray] = {}
        offset = 0
        for i, item in enumerate(inputs):
            if not isinstance(item, dict):
                raise HttpError(400, f"inputs[{i}] must be an object {{name, shape, datatype, "
                                     "data}")
            name = item.get("name")
            if not isinstance(name, str):
                raise HttpError(400, f"inputs[{i}]: 'name' must be a string")
            spec = specs.get(name)
            if spec is None:
                raise HttpError(400, f"unknown input '{name}'; model '{served.name}' expects "
                                     + ", ".join(s.describe() for s in served.predictor.inputs))
            if name in feed:
                raise HttpError(400, f"input '{name}' given twice")
            # Drop the request's reference so a JSON ``data`` list is freed once its
            # array exists, not when the whole request is done.
            inputs[i] = None
            arr, used = decode_tensor(name, spec.dtype, item, blobs, offset,
                                      self.config.allow_nan)
            offset += used
            feed[name] = arr
        if offset != len(blobs):
            raise HttpError(400, f"binary body has {len(blobs) - offset} byte(s) no input "
                                 "claimed (check binary_data_size)")
        missing = [s.describe() for n, s in specs.items() if n not in feed]
        if missing:
            raise HttpError(400, f"missing input(s): {'; '.join(missing)}")
        _check_named_dims(served, feed)
        binary_out = bool(params.get("binary_data_output", False))
        wanted: list[tuple[str, bool]] | None = None
        classes: dict[str, int] = {}
        outs = request.get("outputs")
        if outs is not None:
            if not isinstance(outs, list):
                raise HttpError(400, "'outputs' must be a list of {name}")
            names = {o.name for o in served.predictor.outputs}
            wanted = []
            for j, o in enumerate(outs):
                if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                    raise HttpError(400, f"outputs[{j}] must be an object with a 'name'")
                if o["name"] not in names:
                    raise HttpError(400, f"unknown output '{o['name']}'; model "
                                         f"'{served.name}' has {', '.join(sorted(names))}")
                op = o.get("parameters") or {}
                wanted.append((o["name"], bool(op.get("binary_data", binary_out))
                               if isinstance(op, dict) else binary_out))
                if isinstance(op, dict) and "classification" in op:
                    k = op["classification"]
                    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                        raise HttpError(400, f"outputs[{j}]: 'classification' must be a "
                                             f"whole number >= 1, got {_short(k)}")
                    classes[o["name"]] = k
        return feed, binary_out, wanted, request.get("id"), classes


class _ModelStats:
    """Triton's inference statistics of one model version (nanosecond sums)."""

    _PHASES = ("queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ok = self.failed = 0
        self.ok_ns = self.failed_ns = 0
        self.phase_ns = dict.fromkeys(self._PHASES, 0)
        self.last_ms = 0

    def success(self, total: float, *phases: float) -> None:
        with self._lock:
            self.ok += 1
            self.ok_ns += int(total * 1e9)
            for key, sec in zip(self._PHASES, phases, strict=True):
                self.phase_ns[key] += int(sec * 1e9)
            self.last_ms = int(time.time() * 1000)

    def fail(self, total: float) -> None:
        with self._lock:
            self.failed += 1
            self.failed_ns += int(total * 1e9)
            self.last_ms = int(time.time() * 1000)

    def triton(self, name: str, version: str) -> dict[str, Any]:
        with self._lock:
            stats: dict[str, Any] = {"success": {"count": self.ok, "ns": self.ok_ns},
                                     "fail": {"count": self.failed, "ns": self.failed_ns}}
            for key, ns in self.phase_ns.items():
                stats[key] = {"count": self.ok, "ns": ns}
            stats["cache_hit"] = stats["cache_miss"] = {"count": 0, "ns": 0}
            return {"name": name, "version": version, "last_inference": self.last_ms,
                    "inference_count": self.ok, "execution_count": self.ok,
                    "inference_stats": stats, "batch_stats": [], "memory_usage": []}


def _triton_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _triton_config(served: Served) -> dict[str, Any]:
    """The model's configuration in Triton's JSON form (``max_batch_size`` 0: the dims
    are the whole shape, -1 where it varies)."""
    p = served.predictor

    def tensor(s: Any) -> dict[str, Any]:
        return {"name": s.name, "data_type": _triton_type(datatype_of(s.dtype)),
                "dims": [d if isinstance(d, int) else -1 for d in s.shape]}

    platform = _PLATFORM.get(p.format, p.format)
    return {"name": served.name, "platform": platform,
            "backend": "onnxruntime" if platform == "onnxruntime_onnx" else p.format,
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": 0, "input": [tensor(s) for s in p.inputs],
            "output": [tensor(s) for s in p.outputs]}


def _check_named_dims(served: Served, feed: Mapping[str, np.ndarray]) -> None:
    # A symbolic dim shared by inputs (``batch``) must agree, or the model fails inside
    # the runtime and the client's mistake would count against the model's health.
    specs = served.predictor.inputs
    if any(feed[s.name].ndim != len(s.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(s.shape, feed[s.name].shape,
                                                          strict=True)) for s in specs):
        return  # the predictor answers this one, naming the expected signature
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        for dim, size in zip(spec.shape, feed[spec.name].shape, strict=True):
            if not isinstance(dim, str):
                continue
            first = seen.setdefault(dim, (spec.name, size))
            if first[1] != size:
                raise HttpError(400, f"inputs disagree on dim '{dim}': '{first[0]}' has "
                                     f"{first[1]}, '{spec.name}' has {size}")


def _media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _image_task(served: Served) -> ImageTask:
    try:
        return ImageTask.from_manifest(served.predictor.manifest, f"model '{served.name}'")
    except InputError as err:
        raise HttpError(415, f"{err}; send tensors as KServe v2 JSON instead") from err


def _classified(served: Served, outputs: Mapping[str, np.ndarray],
                classes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Triton's classification extension: each requested output becomes BYTES
    ``"<value>:<index>[:<label>]"``, the top K along its last axis, best first. A
    ``classify`` artifact's ``scores`` are already the top classes: their index is the
    ``class_ids`` one."""
    manifest = served.predictor.manifest
    extra = manifest.extra if manifest is not None else {}
    labels = extra.get("labels")
    names = [str(x) for x in labels] if isinstance(labels, list) else []
    post = extra.get("postprocess")
    topk_done = isinstance(post, Mapping) and post.get("task") == "classify"
    out = dict(outputs)
    for name, k in classes.items():
        arr = np.asarray(outputs[name])
        if arr.ndim < 1 or arr.dtype.kind not in "biuf":
            raise HttpError(400, f"output '{name}' ({arr.dtype}, shape {list(arr.shape)}) "
                                 "has no classes to rank for 'classification'")
        if topk_done and name == "scores" and "class_ids" in outputs:
            order = np.broadcast_to(np.arange(arr.shape[-1]), arr.shape)[..., :k]
            index = np.asarray(outputs["class_ids"])[..., :k]
        else:
            # Negated as float64 or int64: unsigned and bool values do not negate.
            key = arr.astype(np.float64 if arr.dtype.kind == "f" else np.int64)
            order = np.argsort(-key, axis=-1, kind="stable")[..., :k]
            index = order
        values = np.take_along_axis(arr, order, axis=-1)
        fmt = "{:f}" if arr.dtype.kind == "f" else "{:d}"
        text = [fmt.format(v) + f":{i}" + (f":{names[i]}" if 0 <= i < len(names) else "")
                for v, i in zip(values.reshape(-1).tolist(), index.reshape(-1).tolist(),
                                strict=True)]
        out[name] = np.array(text, dtype=object).reshape(values.shape)
    return out


def _short_name(name: str) -> str:
    """A model name from a request path, as quoted back in an error (bounded)."""
    return name if len(name) <= 128 else name[:125] + "..."


def _method(got: str, want: str) -> None:
    if got != want:
        raise HttpError(405, f"method {got} not allowed here; use {want}")


def _ok(obj: Any) -> tuple[int, str, bytes, dict[str, str]]:
    return 200, _JSON, json.dumps(obj).encode(), {}

