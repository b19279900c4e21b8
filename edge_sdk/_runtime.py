"""Predictor: one interface over onnxruntime and ai-edge-litert.

The hot path is :meth:`Predictor.predict`: inputs are checked against the
signature with checks prepared once at load time, then handed to the backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ._answers import MAX_IMAGE_PIXELS, Answer, ImageTask, as_image
from ._artifact import MANIFEST_NAME, Artifact, Manifest, TensorSpec, format_for_path
from ._bench import runtime_load_error_text
from ._oneline import one_line
from .errors import InputError, ModelLoadError

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


class _Backend(Protocol):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feed: dict[str, np.ndarray]) -> list[Any]: ...


class _OrtBackend:
    def __init__(self, path: Path, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:  # pragma: no cover - base dependency
            raise ModelLoadError("onnxruntime is not installed (pip install edge-sdk)") from err
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            raise ModelLoadError(f"{path}: onnxruntime cannot load this model: "
                                 f"{runtime_load_error_text(err)}") from err
        self.inputs = tuple(_ort_spec(a) for a in self.session.get_inputs())
        self.outputs = tuple(_ort_spec(a) for a in self.session.get_outputs())
        self._output_names = [o.name for o in self.outputs]
        self._run_options = ort.RunOptions()
        # A failed run raises with the runtime's message; its log line on stderr would
        # only repeat it (and a shape search prints one per tried shape).
        self._run_options.log_severity_level = 4
        self._run = self.session.run

    def run(self, feed: dict[str, np.ndarray]) -> list[Any]:
        out: list[Any] = self._run(self._output_names, feed, self._run_options)
        return out


def _ort_spec(arg: Any) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type, arg.type)
    shape = tuple(d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None)
                  for d in (arg.shape or []))
    return TensorSpec(arg.name, dtype, shape)


class _TfliteBackend:
    """LiteRT interpreter. Quantized int8/uint8 tensors are presented as float32
    (scale/zero-point applied here) unless ``raw_quantized`` is asked."""

    def __init__(self, path: Path, threads: int | None, raw_quantized: bool = False) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as err:
            raise ModelLoadError(
                "running .tflite models needs ai-edge-litert (pip install 'edge-sdk[agent]')"
            ) from err
        try:
            self.interp = Interpreter(model_path=str(path), num_threads=threads)
            sigs = self.interp.get_signature_list()
            if sigs:
                key = next(iter(sigs))
                self._runner: Any = self.interp.get_signature_runner(key)
                in_details = list(self._runner.get_input_details().items())
                out_details = list(self._runner.get_output_details().items())
                order = sigs[key]
                in_details.sort(key=lambda kv: order["inputs"].index(kv[0]))
                out_details.sort(key=lambda kv: order["outputs"].index(kv[0]))
            else:
                self._runner = None
                self.interp.allocate_tensors()
                in_details = [(d["name"], d) for d in self.interp.get_input_details()]
                out_details = [(d["name"], d) for d in self.interp.get_output_details()]
        except Exception as err:
            raise ModelLoadError(
                f"{path}: LiteRT cannot load this model: {one_line(err)}") from err
        self._in: list[tuple[str, dict[str, Any], tuple[float, int] | None]] = []
        self._out: list[tuple[str, dict[str, Any], tuple[float, int] | None]] = []
        ins, outs = [], []
        for name, d in in_details:
            q = None if raw_quantized else _quant_params(d)
            self._in.append((name, d, q))
            ins.append(_tflite_spec(name, d, q))
        for name, d in out_details:
            q = None if raw_quantized else _quant_params(d)
            self._out.append((name, d, q))
            outs.append(_tflite_spec(name, d, q))
        self.inputs = tuple(ins)
        self.outputs = tuple(outs)

    def run(self, feed: dict[str, np.ndarray]) -> list[Any]:
        prepared: dict[str, np.ndarray] = {}
        for name, d, q in self._in:
            arr = feed[name]
            if q is not None:
                scale, zp = q
                info = np.iinfo(d["dtype"])
                arr = np.clip(np.round(arr / scale + zp), info.min, info.max).astype(d["dtype"])
            prepared[name] = arr
        if self._runner is not None:
            res = self._runner(**prepared)
            raw = [res[name] for name, _, _ in self._out]
        else:
            interp = self.interp
            resized = False
            for name, d, _ in self._in:
                arr = prepared[name]
                if tuple(interp.get_tensor(d["index"]).shape) != arr.shape:
                    interp.resize_tensor_input(d["index"], list(arr.shape))
                    resized = True
            if resized:
                interp.allocate_tensors()
            for name, d, _ in self._in:
                interp.set_tensor(d["index"], prepared[name])
            interp.invoke()
            raw = [interp.get_tensor(d["index"]) for _, d, _ in self._out]
        out: list[Any] = []
        for value, (_, _, q) in zip(raw, self._out, strict=True):
            if q is not None:
                scale, zp = q
                value = (value.astype(np.float32) - np.float32(zp)) * np.float32(scale)
            out.append(value)
        return out


def _quant_params(d: Mapping[str, Any]) -> tuple[float, int] | None:
    if np.dtype(d["dtype"]) not in (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16)):
        return None
    qp = d.get("quantization_parameters") or {}
    scales = qp.get("scales")
    zps = qp.get("zero_points")
    if scales is not None and len(scales) == 1 and float(scales[0]) != 0.0:
        return float(scales[0]), int(zps[0]) if zps is not None and len(zps) else 0
    scale, zp = d.get("quantization", (0.0, 0))
    if scale:
        return float(scale), int(zp)
    return None


def _tflite_spec(name: str, d: Mapping[str, Any], q: tuple[float, int] | None) -> TensorSpec:
    sig = d.get("shape_signature")
    dims = list(sig) if sig is not None and len(sig) else list(d["shape"])
    shape: list[int | str | None] = []
    for i, dim in enumerate(dims):
        dim = int(dim)
        shape.append(("batch" if i == 0 else f"d{i}") if dim < 0 else dim)
    dtype = "float32" if q is not None else np.dtype(d["dtype"]).name
    return TensorSpec(name, dtype, tuple(shape))


class _InputCheck:
    """Checks for one input, prepared once so that predict() does little work per call."""

    __slots__ = ("dtype", "fixed", "name", "rank", "spec")

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.dtype: np.dtype[Any] | None = None if spec.dtype == "str" else _np_dtype(spec.dtype)
        self.rank = len(spec.shape)
        self.fixed = tuple((i, d) for i, d in enumerate(spec.shape) if isinstance(d, int))

    def __call__(self, value: Any) -> np.ndarray:
        dt = self.dtype
        if type(value) is np.ndarray:
            arr = value
            if dt is not None and arr.dtype != dt:
                if not np.can_cast(arr.dtype, dt, "safe"):
                    raise InputError(
                        f"input '{self.name}': dtype {arr.dtype} cannot be cast safely to "
                        f"{dt} (expected {self.spec.describe()}; convert with .astype(np.{dt}))"
                    )
                arr = arr.astype(dt)
        else:
            try:
                arr = np.asarray(value, dtype=dt if dt is not None else object)
            except (ValueError, TypeError) as err:
                raise InputError(
                    f"input '{self.name}': cannot convert {type(value).__name__} to "
                    f"{self.spec.dtype} ({err})"
                ) from err
        if arr.ndim != self.rank:
            raise InputError(
                f"input '{self.name}': expected rank {self.rank} {self.spec.describe()}, "
                f"got shape {list(arr.shape)}"
            )
        shape = arr.shape
        for i, size in self.fixed:
            if shape[i] != size:
                raise InputError(
                    f"input '{self.name}': dim {i} must be {size} "
                    f"(expected {self.spec.describe()}), got shape {list(shape)}"
                )
        return arr


def _np_dtype(name: str) -> np.dtype[Any]:
    try:
        return np.dtype(name)
    except TypeError as err:
        raise ModelLoadError(f"unsupported tensor type {name!r}") from err


class Predictor:
    """A loaded model. Obtain one with :func:`edge_sdk.load`.

    ``inputs`` / ``outputs`` describe the signature. :meth:`predict` is safe to
    call from several threads at once for ONNX models (onnxruntime sessions are
    thread-safe); LiteRT interpreters are not, so callers must serialise those.
    """

    def __init__(
        self, backend: _Backend, *, fmt: str, path: Path, manifest: Manifest | None = None
    ) -> None:
        self._backend = backend
        self.format = fmt
        self.path = path
        self.manifest = manifest
        self.inputs: tuple[TensorSpec, ...] = backend.inputs
        self.outputs: tuple[TensorSpec, ...] = backend.outputs
        self._checks = {s.name: _InputCheck(s) for s in self.inputs}
        self._single = self._checks[self.inputs[0].name] if len(self.inputs) == 1 else None
        self._output_names = tuple(o.name for o in self.outputs)
        self._run = backend.run
        self._task: ImageTask | None = None

    @property
    def name(self) -> str:
        return self.manifest.name if self.manifest else self.path.stem

    @property
    def version(self) -> str | None:
        return self.manifest.version if self.manifest else None

    def predict(self, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        """Run the model. ``inputs`` is a dict name → array, or one array for a
        single-input model. Returns a dict output name → array.

        Raises :class:`~edge_sdk.errors.InputError` when names, dtypes, ranks or
        fixed dims do not match the signature.
        """
        if isinstance(inputs, Mapping):
            checks = self._checks
            if len(inputs) != len(checks) or any(k not in checks for k in inputs):
                raise InputError(self._names_message(inputs))
            feed = {k: checks[k](v) for k, v in inputs.items()}
        elif self._single is not None:
            feed = {self._single.name: self._single(inputs)}
        else:
            raise InputError(
                f"this model has {len(self.inputs)} inputs; pass a dict with "
                f"{', '.join(repr(s.name) for s in self.inputs)}"
            )
        return dict(zip(self._output_names, self._run(feed), strict=True))

    def answer(self, image: Any, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Answer:
        """The task's answer for one image: a JPEG/PNG path (or its bytes) or a uint8 RGB
        array ``[H, W, 3]``. Needs an artifact converted with ``--preprocess image:...``
        and ``--postprocess``; ``answer(img).labels`` (classify), ``.boxes`` (detect),
        ``.class_map`` (segment), ``.embedding`` (embed).

        Raises :class:`~edge_sdk.errors.InputError` for a tensor-only artifact (naming
        what it lacks), an image that is not a JPEG/PNG or over ``max_pixels`` (checked
        from its header, before decoding).
        """
        arr = as_image(image, max_pixels)
        if arr.ndim == 4 and arr.shape[0] != 1:
            raise InputError(f"answer() takes one image, got a batch of {arr.shape[0]}; "
                             "use answers()")
        return self.answers(arr)[0]

    def answers(self, images: Any, *, max_pixels: int = MAX_IMAGE_PIXELS) -> list[Answer]:
        """One answer per image: ``images`` is a uint8 batch ``[N, H, W, 3]`` (one run)
        or a sequence of paths / arrays (one run each, sizes may differ)."""
        task = self._image_task()
        if isinstance(images, np.ndarray):
            feed, single = task.feed(images)
            count = 1 if single else images.shape[0]
            return task.answers(self.predict(feed), count)
        if isinstance(images, (str, os.PathLike, bytes)):
            images = [images]
        out: list[Answer] = []
        for img in images:
            feed, _ = task.feed(as_image(img, max_pixels))
            out.extend(task.answers(self.predict(feed), next(iter(feed.values())).shape[0]))
        return out

    def _image_task(self) -> ImageTask:
        task = self._task
        if task is None:
            task = self._task = ImageTask.from_manifest(self.manifest, repr(self.name))
        return task

    def _names_message(self, inputs: Mapping[str, Any]) -> str:
        expected = [s.name for s in self.inputs]
        got = [str(k) for k in inputs]
        missing = [n for n in expected if n not in inputs]
        unknown = [n for n in got if n not in self._checks]
        parts = []
        if unknown:
            parts.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        sig = "; ".join(s.describe() for s in self.inputs)
        return f"{' and '.join(parts)}; the model expects: {sig}"

    def __repr__(self) -> str:
        return f"Predictor({self.name!r}, format={self.format!r})"


def litert_op_names(interpreter: Any) -> list[str]:
    """The op name of every node in a LiteRT ``Interpreter``'s graph, in graph order."""
    # LiteRT has no public call for the op list (ai-edge-litert 2.3): this is the one
    # place that relies on its underscored one.
    return [op["op_name"] for op in interpreter._get_ops_details()]  # noqa: SLF001


def load_model_file(
    path: str | os.PathLike[str], *, threads: int | None = None, manifest: Manifest | None = None
) -> Predictor:
    p = Path(path)
    fmt = manifest.format if manifest is not None else format_for_path(p)
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such model file")
    backend: _Backend
    if fmt in ("onnx", "ort"):
        backend = _OrtBackend(p, threads)
    else:
        backend = _TfliteBackend(p, threads)
    return Predictor(backend, fmt=fmt, path=p, manifest=manifest)


def load(path: str | os.PathLike[str], *, threads: int | None = None) -> Predictor:
    """Load an artifact directory (manifest and hash verified) or a bare
    ``.onnx`` / ``.ort`` / ``.tflite`` file, ready for :meth:`Predictor.predict`.

    ``threads`` caps the runtime's intra-op threads (default: the runtime's own).
    """
    p = Path(path)
    if p.is_dir() or p.name == MANIFEST_NAME:
        art = Artifact.from_dir(p if p.is_dir() else p.parent)
        return load_model_file(art.model_path, threads=threads, manifest=art.manifest)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    return load_model_file(p, threads=threads)
