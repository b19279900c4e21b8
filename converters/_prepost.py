"""``--preprocess``, ``--postprocess`` and ``--labels``: what the artifact does around the
model, as frozen specs that validate themselves.

    pre = PreSpec.parse("image:size=320x320,resize=letterbox,scale=1/255")
    post = PostSpec.parse("detect:layout=yolov8,score=0.25,iou=0.45,max=100")
    labels = read_labels(Path("labels.txt"))

The graph ops are built from them by :mod:`._prepost_graph`, the numpy reference by
:mod:`._prepost_ref`; both read the same spec, never each other. A bad spec is a
:class:`~edge_sdk.errors.UsageError` of one line naming the key and what it takes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from edge_sdk.errors import UsageError

RESIZES = ("stretch", "letterbox", "center-crop")
CHANNELS = ("rgb", "bgr")
LAYOUTS = ("nchw", "nhwc")
POST_TASKS = ("classify", "detect", "segment", "embed")
DETECT_LAYOUTS = ("yolov8", "yolov5", "boxes-scores")
#: The pad value of a letterbox, in 0..255 pixels (ultralytics' gray).
LETTERBOX_PAD = 114.0
#: The longest labels file read (a label per line).
MAX_LABELS = 100_000
#: Name of the artifact's image input.
IMAGE_INPUT = "image"


def _items(flag: str, text: str, kinds: Sequence[str]) -> tuple[str, dict[str, str]]:
    """``kind:key=value,key=value`` → (kind, {key: value}); a bare ``kind:flag`` entry (no
    ``=``) maps to ``""``."""
    kind, sep, rest = text.strip().partition(":")
    if kind not in kinds:
        raise UsageError(f"{flag} {text!r}: expected one of {', '.join(kinds)} before ':' "
                         f"(e.g. {_EXAMPLES[flag]})")
    out: dict[str, str] = {}
    for part in (p.strip() for p in rest.split(",")) if sep and rest.strip() else ():
        key, eq, value = part.partition("=")
        key = key.strip()
        if not key or (eq and not value.strip()):
            raise UsageError(f"{flag} {text!r}: {part!r} is not KEY=VALUE")
        if key in out:
            raise UsageError(f"{flag} {text!r}: key {key!r} given twice")
        out[key] = value.strip() if eq else ""
    return kind, out


_EXAMPLES = {
    "--preprocess": "image:size=224x224,resize=stretch,scale=1/255,mean=0.485/0.456/0.406,"
                    "std=0.229/0.224/0.225",
    "--postprocess": "classify:topk=5 or detect:layout=yolov8,score=0.25,iou=0.45,max=100",
}


def _unknown(flag: str, kind: str, given: Mapping[str, str], known: Sequence[str]) -> None:
    bad = [k for k in given if k not in known]
    if bad:
        raise UsageError(f"{flag} {kind}: unknown key {bad[0]!r} (keys: {', '.join(known)})")


def _number(flag: str, key: str, value: str, *, low: float | None = None,
            high: float | None = None, positive: bool = False) -> float:
    try:
        x = float(Fraction(value)) if "/" in value else float(value)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{flag} {key}={value!r}: expected a number (e.g. 0.5 or 1/255)"
                         ) from None
    if x != x or x in (float("inf"), float("-inf")):
        raise UsageError(f"{flag} {key}={value!r}: expected a finite number")
    if positive and not x > 0:
        raise UsageError(f"{flag} {key}={value!r}: expected a number > 0")
    if (low is not None and x < low) or (high is not None and x > high):
        raise UsageError(f"{flag} {key}={value!r}: expected a number in [{low}, {high}]")
    return x


def _triple(flag: str, key: str, value: str, *, positive: bool) -> tuple[float, float, float]:
    """``a/b/c`` (one value per channel, RGB order) or one value for all three."""
    parts = value.split("/")
    if len(parts) not in (1, 3):
        raise UsageError(f"{flag} {key}={value!r}: expected one number or three separated "
                         "by '/' (R/G/B)")
    xs = [_number(flag, key, p, positive=positive) for p in parts]
    return (xs[0], xs[0], xs[0]) if len(xs) == 1 else (xs[0], xs[1], xs[2])


def _int(flag: str, key: str, value: str, low: int = 1) -> int:
    if not re.fullmatch(r"\d+", value) or int(value) < low:
        raise UsageError(f"{flag} {key}={value!r}: expected a whole number >= {low}")
    return int(value)


def _choice(flag: str, key: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UsageError(f"{flag} {key}={value!r}: expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class PreSpec:
    """``image:`` pre-processing: a uint8 RGB image ``[N, H, W, 3]`` of any H, W becomes
    the model input: resize to ``size`` (``None``: the model input's own size), channel
    order, ``(pixel * scale - mean) / std`` and layout (``None``: from the model input)."""

    size: tuple[int, int] | None = None  # (height, width)
    resize: str = "stretch"
    channels: str = "rgb"
    layout: str | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    KEYS = ("size", "resize", "channels", "layout", "scale", "mean", "std")

    def __post_init__(self) -> None:
        flag = "--preprocess"
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise UsageError(f"{flag} size={self.size!r}: expected HxW with both >= 1")
        _choice(flag, "resize", self.resize, RESIZES)
        _choice(flag, "channels", self.channels, CHANNELS)
        if self.layout is not None:
            _choice(flag, "layout", self.layout, LAYOUTS)
        if not self.scale > 0:
            raise UsageError(f"{flag} scale={self.scale}: expected a number > 0")
        if not all(s > 0 for s in self.std):
            raise UsageError(f"{flag} std={self.std}: expected numbers > 0")

    @classmethod
    def parse(cls, text: str) -> PreSpec:
        flag = "--preprocess"
        kind, kv = _items(flag, text, ("image",))
        _unknown(flag, kind, kv, cls.KEYS)
        fields: dict[str, Any] = {}
        if "size" in kv:
            m = re.fullmatch(r"(\d+)[x,](\d+)", kv["size"])
            if m is None or min(int(m.group(1)), int(m.group(2))) < 1:
                raise UsageError(f"{flag} size={kv['size']!r}: expected HxW (e.g. 320x320)")
            fields["size"] = (int(m.group(1)), int(m.group(2)))
        for key, choices in (("resize", RESIZES), ("channels", CHANNELS), ("layout", LAYOUTS)):
            if key in kv:
                fields[key] = _choice(flag, key, kv[key], choices)
        if "scale" in kv:
            fields["scale"] = _number(flag, "scale", kv["scale"], positive=True)
        if "mean" in kv:
            fields["mean"] = _triple(flag, "mean", kv["mean"], positive=False)
        if "std" in kv:
            fields["std"] = _triple(flag, "std", kv["std"], positive=True)
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        return {"input": IMAGE_INPUT, "dtype": "uint8", "shape": ["batch", "height", "width", 3],
                "color": "RGB", "size": list(self.size) if self.size else None,
                "resize": self.resize, "channels": self.channels, "layout": self.layout,
                "scale": self.scale, "mean": list(self.mean), "std": list(self.std),
                "interpolation": "bilinear, half-pixel centres, no antialias",
                **({"pad_value": LETTERBOX_PAD} if self.resize == "letterbox" else {})}


@dataclass(frozen=True)
class PostSpec:
    """What the model's outputs become: ``classify`` (``topk``), ``detect`` (``layout``,
    thresholds, ``max`` per image), ``segment`` (``argmax``), ``embed`` (``l2norm``).
    ``output``: the model output to read (default: the one the task fits)."""

    task: str
    topk: int = 5
    layout: str = "yolov8"
    score: float = 0.25
    iou: float = 0.45
    max: int = 100
    output: str | None = None

    def __post_init__(self) -> None:
        flag = "--postprocess"
        _choice(flag, "task", self.task, POST_TASKS)
        _choice(flag, "layout", self.layout, DETECT_LAYOUTS)
        if self.topk < 1:
            raise UsageError(f"{flag} topk={self.topk}: expected a whole number >= 1")
        if not 0.0 <= self.score <= 1.0:
            raise UsageError(f"{flag} score={self.score}: expected a number in [0, 1]")
        if not 0.0 <= self.iou <= 1.0:
            raise UsageError(f"{flag} iou={self.iou}: expected a number in [0, 1]")
        if self.max < 1:
            raise UsageError(f"{flag} max={self.max}: expected a whole number >= 1")

    @classmethod
    def parse(cls, text: str) -> PostSpec:
        flag = "--postprocess"
        kind, kv = _items(flag, text, POST_TASKS)
        _unknown(flag, kind, kv, _POST_KEYS[kind])
        fields: dict[str, Any] = {"task": kind}
        if kv.get("output"):
            fields["output"] = kv["output"]
        if kind == "classify" and "topk" in kv:
            fields["topk"] = _int(flag, "topk", kv["topk"])
        if kind == "detect":
            if "layout" in kv:
                fields["layout"] = _choice(flag, "layout", kv["layout"], DETECT_LAYOUTS)
            for key in ("score", "iou"):
                if key in kv:
                    fields[key] = _number(flag, key, kv[key], low=0.0, high=1.0)
            if "max" in kv:
                fields["max"] = _int(flag, "max", kv["max"])
        for flag_key in ("argmax", "l2norm"):
            if kv.get(flag_key):
                raise UsageError(f"{flag} {kind}:{flag_key} takes no value")
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task}
        if self.task == "classify":
            out["topk"] = self.topk
        elif self.task == "detect":
            out.update(layout=self.layout, score=self.score, iou=self.iou, max=self.max,
                       nms="per class, each box with its best class")
        elif self.task == "segment":
            out["op"] = "argmax"
        else:
            out["op"] = "l2norm"
        if self.output:
            out["output"] = self.output
        return out


_POST_KEYS: Mapping[str, tuple[str, ...]] = {
    "classify": ("topk", "output"),
    "detect": ("layout", "score", "iou", "max", "output"),
    "segment": ("argmax", "output"),
    "embed": ("l2norm", "output"),
}


def read_labels(path: Path) -> tuple[str, ...]:
    """One label per line (UTF-8; surrounding blanks dropped; trailing empty lines
    ignored). An empty label in the middle is kept as ``""`` so indices stay aligned."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--labels {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--labels {p}: cannot read it as UTF-8 text ({err})") from err
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise UsageError(f"--labels {p}: no label in it (one label per line)")
    if len(lines) > MAX_LABELS:
        raise UsageError(f"--labels {p}: {len(lines)} labels, more than {MAX_LABELS}")
    return tuple(lines)


@dataclass(frozen=True)
class PipelineSpec:
    """The three flags together (any may be absent)."""

    pre: PreSpec | None
    post: PostSpec | None
    labels: tuple[str, ...] | None
    labels_file: str | None = None

    @property
    def graph(self) -> bool:
        """Whether ops go into the graph (labels alone only go into the manifest)."""
        return self.pre is not None or self.post is not None

    @classmethod
    def from_options(cls, preprocess: str | None, postprocess: str | None,
                     labels: Path | None) -> PipelineSpec | None:
        if preprocess is None and postprocess is None and labels is None:
            return None
        return cls(pre=None if preprocess is None else PreSpec.parse(preprocess),
                   post=None if postprocess is None else PostSpec.parse(postprocess),
                   labels=None if labels is None else read_labels(Path(labels)),
                   labels_file=None if labels is None else Path(labels).name)

    def check_classes(self, classes: int, what: str) -> None:
        """Refuse a labels file whose count is not the model's number of classes."""
        if self.labels is not None and len(self.labels) != classes:
            raise UsageError(f"--labels {self.labels_file}: {len(self.labels)} labels, but "
                             f"{what} has {classes} classes")


@dataclass(frozen=True)
class Bound:
    """A spec bound to one model: the concrete sizes, layout and tensors both the graph
    builder and the numpy reference read."""

    spec: PipelineSpec
    model_input: str
    input_dtype: str  # numpy name of the model input's dtype
    size: tuple[int, int]  # (height, width) of the model input
    layout: str  # nchw | nhwc
    output: str | None  # the model output post-processing reads
    partner: str | None = None  # detect boxes-scores: the scores output
    classes: int = 0
    softmax: bool = False  # classify: the head gives logits
    sigmoid: bool = False  # detect: class scores are logits
    boxes_t: bool = False  # boxes-scores: boxes [B, 4, N]
    scores_t: bool = False  # boxes-scores: scores [B, C, N]
    box_format: str = "xyxy"  # boxes-scores: xyxy | cxcywh
    class_axis: int = 1  # segment: 1 (NCHW scores) or -1 (NHWC)

    @property
    def pre(self) -> PreSpec | None:
        return self.spec.pre

    @property
    def post(self) -> PostSpec | None:
        return self.spec.post

    def outputs_meaning(self) -> dict[str, str]:
        """What each output of the artifact means (the manifest's ``outputs``)."""
        post = self.post
        where = ("input-image pixels (x0, y0, x1, y1)" if self.pre is not None
                 else "model-input pixels (x0, y0, x1, y1)")
        if post is None:
            return {}
        if post.task == "classify":
            k = min(post.topk, self.classes)
            return {"scores": f"[N, {k}] float32: the top-{k} class probabilities, best first",
                    "class_ids": f"[N, {k}] int64: their class indices (labels[i])"}
        if post.task == "detect":
            return {"boxes": f"[M, 4] float32: detections' boxes in {where}",
                    "scores": "[M] float32: each detection's score (best first per image)",
                    "class_ids": "[M] int64: each detection's class index (labels[i])",
                    "batch_index": "[M] int64: the image of the batch each detection is in"}
        if post.task == "segment":
            at = "the input image's size" if self.pre is not None else "the model's mask size"
            return {"class_map": f"[N, H, W] int64: the class index per pixel at {at}"}
        return {"embedding": "[N, D] float32: the embedding, L2-normalized"}


def pipeline_lines(report: Mapping[str, Any]) -> list[str]:
    """The report's pipeline section in lines (CLI summary and report.md)."""
    sec = report.get("pipeline") or {}
    if not sec:
        return []
    lines = []
    acc = sec.get("accuracy") or {}
    imgs = sec.get("images") or {}
    if acc:
        lines.append(f"pipeline ({'raw images in, ' if 'latency_ms' in sec else ''}vs the "
                     f"reference pipeline on {imgs.get('count', '?')} samples from "
                     f"{imgs.get('origin', '?')}): {acc.get('summary', '')}")
    ref = sec.get("reference")
    if ref:
        lines.append(f"in-graph pre-processing vs the numpy reference: max |Δ| "
                     f"{ref.get('max_abs_diff', 0):.3g}"
                     + ("" if ref.get("held") else " (BEYOND BUDGET)"))
    skew = sec.get("skew")
    if skew:
        state = "within budget" if skew.get("held") else "TRAINING-SERVING SKEW"
        lines.append(f"pre-processing vs {skew.get('against')}: mean |Δ| "
                     f"{skew.get('relative_mean_abs_diff', 0):.3g} of their spread, max |Δ| "
                     f"{skew.get('max_abs_diff', 0):.3g} ({state}, budget "
                     f"{skew.get('budget', 0):.3g})")
    if sec.get("latency_ms") is not None:
        lines.append(f"pipeline latency (one image, median): {sec['latency_ms']:.2f} ms")
    return lines


__all__ = [
    "CHANNELS",
    "DETECT_LAYOUTS",
    "IMAGE_INPUT",
    "LAYOUTS",
    "LETTERBOX_PAD",
    "POST_TASKS",
    "RESIZES",
    "Bound",
    "PipelineSpec",
    "PostSpec",
    "PreSpec",
    "pipeline_lines",
    "read_labels",
]
