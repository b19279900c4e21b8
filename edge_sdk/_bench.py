"""Latency measurement and synthetic inputs shared by ``edge-sdk bench`` and the
converters."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ._artifact import TensorSpec


@dataclass(frozen=True)
class LatencyStats:
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_per_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure(fn: Callable[[], Any], *, runs: int = 100, warmup: int = 10) -> LatencyStats:
    """Call ``fn`` ``warmup`` times, then time ``runs`` calls one by one."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(max(0, warmup)):
        fn()
    times = np.empty(runs, dtype=np.float64)
    clock = time.perf_counter
    for i in range(runs):
        t0 = clock()
        fn()
        times[i] = clock() - t0
    ms = times * 1e3
    mean = float(ms.mean())
    return LatencyStats(
        runs=runs,
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=mean,
        min_ms=float(ms.min()),
        throughput_per_s=1e3 / mean if mean > 0 else float("inf"),
    )


def synthetic_inputs(
    specs: Sequence[TensorSpec], *, batch: int = 1, seed: int = 0,
    dims: Mapping[str, int] | None = None, other: int = 1, int_high: int = 8,
) -> dict[str, np.ndarray]:
    """Random inputs matching ``specs``; symbolic dims become ``batch`` (axis 0) or
    ``other``, unless ``dims`` names their size.

    Float inputs are standard normal, integer inputs values in ``[0, int_high)``
    (valid token ids / indices for most models), string inputs short ASCII words,
    booleans random; every other dtype is zeros.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
            elif isinstance(d, str) and dims and d in dims:
                shape.append(dims[d])
            else:
                shape.append(batch if i == 0 else other)
        if spec.dtype == "str":
            # onnxruntime takes string tensors as numpy object arrays of str.
            words = np.array(["a", "the", "edge", "model"], dtype=object)
            out[spec.name] = words[rng.integers(0, len(words), shape)]
            continue
        dt = np.dtype(spec.dtype)
        if dt.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            out[spec.name] = rng.integers(0, 2, shape).astype(dt)
        elif dt.kind in "iu":
            out[spec.name] = rng.integers(0, max(1, int_high), shape).astype(dt)
        else:
            out[spec.name] = np.zeros(shape, dtype=dt)
    return out


#: Sizes tried, in order, for the symbolic height and width of an image-like input
#: (rank 4, channels fixed): H = W, the sizes vision models are commonly exported for.
IMAGE_SIZES = (224, 256, 320, 640, 32, 64)
#: Sizes tried for every other symbolic dim (sequence lengths, feature counts); 16
#: first, the size used before shapes were searched.
OTHER_SIZES = (16, 32, 64, 128, 256, 512)

Shapes = dict[str, tuple[int, ...]]


def concrete_specs(specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]]
                   ) -> list[TensorSpec]:
    """``specs`` with the shapes of the inputs named in ``shapes`` made concrete."""
    return [TensorSpec(s.name, s.dtype, tuple(int(d) for d in shapes[s.name]))
            if s.name in shapes else s for s in specs]


def symbolic_dims(spec: TensorSpec) -> list[str]:
    """The names (``dim 2`` when unnamed) of ``spec``'s symbolic dims after the batch axis."""
    return [d if isinstance(d, str) else f"dim {i}"
            for i, d in enumerate(spec.shape) if i > 0 and not isinstance(d, int)]


def shape_text(shape: Sequence[int]) -> str:
    """``1x3x224x224``: the form ``--input-shape`` takes."""
    return "x".join(str(d) for d in shape)


@dataclass(frozen=True)
class ShapeSearch:
    """What :func:`search_input_shapes` found: ``shapes`` the model ran on (None when
    no try ran), every shape ``tried`` and the last ``error``."""

    shapes: Shapes | None
    tried: tuple[Shapes, ...] = ()
    error: str | None = None
    free: dict[str, list[str]] = field(default_factory=dict)  # input -> its guessed dims
    int_high: int = 8  # integer inputs drawn from [0, int_high): ids a Gather accepts


# onnxruntime's Gather/GatherElements on an id past the table: "... must be within the
# inclusive range [-5,4]" -> synthetic ids below 5.
_INDEX_RANGE = re.compile(r"within the inclusive range \[-?\d+\s*,\s*(\d+)\]")

# "A by B" (broadcast), "Got: A Expected: B" (fixed dims): when A is the size tried, the
# model named B as the size it wants.
_NAMED_SIZES = (re.compile(r"\b(\d+) by (\d+)\b"),
                re.compile(r"Got:\s*(\d+)\s+Expected:\s*(\d+)"))


def search_input_shapes(
    run: Callable[[dict[str, np.ndarray]], Any], specs: Sequence[TensorSpec], *,
    batch: int = 1, given: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
    max_tries: int = 10,
) -> ShapeSearch:
    """Find input shapes ``run`` accepts, at most ``max_tries`` runs on random inputs.

    Inputs in ``given`` keep their shape (a dim name they share passes its size on); a
    symbolic axis 0 is ``batch``; the other symbolic dims are guessed: H = W from
    :data:`IMAGE_SIZES` for image-like inputs, :data:`OTHER_SIZES` for the rest, and
    first any size the last failure's message asks for. Any exception of ``run`` counts
    as a rejection of the shapes.
    """
    known: dict[str, int] = {}  # dim name (or "input/axis") -> size
    image: set[str] = set()
    free: dict[str, list[str]] = {}
    for s in specs:
        if given and s.name in given:
            for i, d in enumerate(s.shape):
                if isinstance(d, str):
                    known.setdefault(d, int(given[s.name][i]))
    for s in specs:
        if given and s.name in given:
            continue
        for i, d in enumerate(s.shape):
            if isinstance(d, int):
                continue
            key = d if isinstance(d, str) else f"{s.name}/{i}"
            if i == 0:
                known.setdefault(key, batch)
            elif key not in known:
                free.setdefault(s.name, []).append(d if isinstance(d, str) else f"dim {i}")
                if _spatial(s, i):
                    image.add(key)

    def shapes_for(img: int, other: int) -> Shapes:
        out: Shapes = {}
        for s in specs:
            if given and s.name in given:
                out[s.name] = tuple(int(d) for d in given[s.name])
                continue
            dims = []
            for i, d in enumerate(s.shape):
                key = d if isinstance(d, str) else f"{s.name}/{i}"
                dims.append(d if isinstance(d, int) else known.get(
                    key, img if key in image else other))
            out[s.name] = tuple(dims)
        return out

    queue: list[tuple[int, int]] = [(IMAGE_SIZES[k % len(IMAGE_SIZES)],
                                     OTHER_SIZES[k % len(OTHER_SIZES)])
                                    for k in range(max(len(IMAGE_SIZES), len(OTHER_SIZES)))]
    if not free:
        queue = queue[:1]
    tried: list[Shapes] = []
    error = None
    int_high = 8
    runs = 0
    while queue and runs < max_tries:
        img, other = queue.pop(0)
        shapes = shapes_for(img, other)
        if shapes in tried:
            continue
        runs += 1
        try:
            run(synthetic_inputs(concrete_specs(specs, shapes), seed=seed, int_high=int_high))
        except Exception as err:
            error = runtime_error_text(err)
            bound = index_bound(error)
            if bound is not None and bound < int_high:
                # An id out of an embedding table is not a shape problem: same shapes,
                # ids inside the table the message names.
                int_high = bound
                queue.insert(0, (img, other))
                continue
            tried.append(shapes)
            named = _named_sizes(error, {img, other})
            queue[:0] = [(n, n) for n in named]
            continue
        tried.append(shapes)
        return ShapeSearch(shapes, tuple(tried), None, free, int_high)
    return ShapeSearch(None, tuple(tried), error, free, int_high)


def index_bound(error: str) -> int | None:
    """The number of rows an out-of-range index error names (``[-5,4]`` → 5), if any."""
    m = _INDEX_RANGE.search(error)
    return int(m.group(1)) + 1 if m and int(m.group(1)) >= 0 else None


_ORT_NODE = re.compile(r"while running (\w+) node\..*?Status Message:\s*(?:\S+\.\w+:\d+\s+"
                       r"(?:[\w:]+\s+)?)?(.*)$")


def runtime_error_text(err: BaseException) -> str:
    """``err`` on one short line: onnxruntime's node failures as ``Concat: <message>``."""
    text = " ".join(str(err).split()) or type(err).__name__
    m = _ORT_NODE.search(text)
    return f"{m.group(1)}: {m.group(2)}" if m else text


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_ORT_OPSET = re.compile(r"Opset (\d+) is under development.*?domain ([\w.]+) is till opset (\d+)")
# "model_load_utils.h:46 void onnxruntime::f(const std::string&, int) ": a C++ frame.
_CPP_FRAME = re.compile(r"\S+\.(?:h|cc|cpp):\d+\s+"
                        r"(?:[\w:<>,&*\s]+\([^()]*(?:\([^()]*\)[^()]*)*\)\s*)?")


def runtime_load_error_text(err: BaseException) -> str:
    """Why onnxruntime cannot load a model, on one line, without its C++ frames; an opset
    newer than it supports says so and which one it supports."""
    text = " ".join(str(err).split()) or type(err).__name__
    m = _ORT_OPSET.search(text)
    if m:
        return (f"opset {m.group(1)} is newer than this onnxruntime supports ({m.group(2)} up "
                f"to opset {m.group(3)}); export the model at opset {m.group(3)} or lower")
    return _CPP_FRAME.sub("", _ORT_PREFIX.sub("", text)).strip()


def _spatial(spec: TensorSpec, axis: int) -> bool:
    """Whether ``axis`` is H or W of a rank-4 input with fixed channels (NCHW or NHWC)."""
    if len(spec.shape) != 4:
        return False
    if isinstance(spec.shape[1], int):
        return axis in (2, 3)
    return isinstance(spec.shape[3], int) and axis in (1, 2)


def _named_sizes(message: str, tried: set[int]) -> list[int]:
    out: list[int] = []
    for pattern in _NAMED_SIZES:
        for m in pattern.finditer(message):
            a, b = int(m.group(1)), int(m.group(2))
            for mine, wanted in ((a, b), (b, a)):
                if mine in tried and wanted not in tried and wanted > 1 and wanted not in out:
                    out.append(wanted)
    return out[:2]
