"""The conversion side of ``--preprocess/--postprocess/--labels``: bind the spec to the
model, read evaluation images, wrap the chosen candidate and verify the whole pipeline
(raw images in) against the source model run inside the numpy reference pipeline.

The driver (:func:`converters._pipeline.drive`) calls, in order::

    pp = Prepost.start(spec, input_specs)        # the pre-processing bound to the input
    samples = pp.load(npz, input_specs, what)    # images → the bare model's samples
    pp.bind_outputs(reference, plan, names)      # what post-processing reads
    model_file = pp.attach(chosen_onnx, ...)     # wrapped, checked; pp.section for reports
    extra.update(pp.manifest())

Evaluation images come from an ``.npz`` with an ``image`` array (uint8 ``[N, H, W, 3]``,
RGB). When it also holds the model input (the tensors the training pipeline made from
those images), the in-graph pre-processing is compared with them: a difference beyond
the budget is a training-serving skew, reported, and the pipeline is not verified.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

import edge_sdk
from edge_sdk._internal import load_npz, one_line
from edge_sdk.errors import ConversionError, UsageError

from ._data import Samples, samples_from_arrays
from ._measure import default_max_drop
from ._prepost import IMAGE_INPUT, Bound, PipelineSpec, pipeline_lines
from ._prepost_graph import model_opset, preprocess_model, wrap
from ._prepost_ref import postprocess, preprocess
from ._tasks import (
    BUDGETS,
    DetectConfig,
    OutputMetric,
    TaskPlan,
    class_changes,
    detector_outputs,
    is_probabilities,
    match_detections,
    score_cosine,
    segment_layout,
)

#: Synthetic image sizes (as fractions of the model input) when no image is given.
SYNTHETIC_SIZES = ((1.0, 1.0), (0.75, 1.3), (1.6, 0.6))
#: Mean |in-graph - given| pre-processed tensor, relative to the given tensors' spread,
#: beyond which the pre-processing is called a training-serving skew.
SKEW_BUDGET = 0.02
#: The key of the model's own tensors in an evaluation file when its input is ``image``.
GIVEN_PREFIX = "model/"
#: Evaluation images (of one size) also run as one batch, checked against one by one.
BATCH_CHECK = 8
#: Runs of the whole pipeline timed for the report.
TIMED_RUNS = 5

Reference = Callable[[dict[str, np.ndarray]], Mapping[str, Any]]


@dataclass(frozen=True)
class Images:
    """Evaluation images (each ``[1, H, W, 3]`` uint8) and, when the file gave them, the
    model input tensors made from them by the training pipeline."""

    images: tuple[np.ndarray, ...]
    given: tuple[np.ndarray, ...] | None
    origin: str

    @property
    def real(self) -> bool:
        return self.origin != "synthetic"


class Prepost:
    """One conversion's pipeline state (built by the driver, never by users)."""

    def __init__(self, spec: PipelineSpec, bound: Bound | None) -> None:
        self.spec = spec
        self.bound = bound
        self.images: Images | None = None
        self.section: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.sample: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------ binding

    @classmethod
    def start(cls, spec: PipelineSpec, specs: Sequence[edge_sdk.TensorSpec]) -> Prepost:
        """Bind the pre-processing to the model input (size, layout, dtype)."""
        if not spec.graph:
            return cls(spec, None)
        if spec.pre is None:
            return cls(spec, Bound(spec, model_input="", input_dtype="float32", size=(0, 0),
                                   layout="nchw", output=None))
        if len(specs) != 1:
            raise UsageError(f"--preprocess image: the model has {len(specs)} inputs "
                             f"({', '.join(s.name for s in specs)}); an image pipeline feeds "
                             "a model with one image input")
        inp = specs[0]
        if len(inp.shape) != 4:
            raise UsageError(f"--preprocess image: the model input {inp.describe()} is not "
                             "an image batch [N, 3, H, W] or [N, H, W, 3]")
        if inp.dtype not in ("float32", "float16", "float64"):
            raise UsageError(f"--preprocess image: the model input {inp.describe()} is not "
                             "float; the pre-processing makes float tensors")
        pre = spec.pre
        layout = pre.layout or ("nchw" if inp.shape[1] == 3 else "nhwc" if inp.shape[3] == 3
                                else None)
        if layout is None:
            raise UsageError(f"--preprocess image: cannot tell the layout of {inp.describe()}; "
                             "give layout=nchw or layout=nhwc")
        c_axis, h_axis, w_axis = (1, 2, 3) if layout == "nchw" else (3, 1, 2)
        if isinstance(inp.shape[c_axis], int) and inp.shape[c_axis] != 3:
            raise UsageError(f"--preprocess image layout={layout}: the model input "
                             f"{inp.describe()} has {inp.shape[c_axis]} channels, not 3")
        fixed = (inp.shape[h_axis], inp.shape[w_axis])
        if pre.size is not None:
            if all(isinstance(d, int) for d in fixed) and tuple(fixed) != pre.size:
                raise UsageError(f"--preprocess size={pre.size[0]}x{pre.size[1]}: the model "
                                 f"input {inp.describe()} takes {fixed[0]}x{fixed[1]}")
            size = pre.size
        elif isinstance(fixed[0], int) and isinstance(fixed[1], int):
            size = (fixed[0], fixed[1])
        else:
            raise UsageError(f"--preprocess image: the model input {inp.describe()} has no "
                             "fixed height and width; give size=HxW")
        return cls(spec, Bound(spec, model_input=inp.name, input_dtype=inp.dtype, size=size,
                               layout=layout, output=None))

    def bind_outputs(self, reference: Sequence[Mapping[str, np.ndarray]],
                     plan: TaskPlan, output_names: Sequence[str]) -> None:
        """Choose the output post-processing reads (and how) from the source's outputs on
        the evaluation data; check the labels' count."""
        spec = self.spec
        ref = [_named(r, output_names) for r in reference]
        first = {k: np.asarray(v) for k, v in ref[0].items()}
        post = spec.post
        if post is None or self.bound is None:
            top1 = [k for k, m in plan.outputs.items() if m.kind == "top1"]
            if top1:
                spec.check_classes(int(first[top1[0]].shape[-1]), f"output {top1[0]!r}")
            return
        floats = [k for k, v in first.items() if v.dtype.kind == "f"]
        if post.output is not None and post.output not in first:
            raise UsageError(f"--postprocess {post.task} output={post.output}: the model has "
                             f"no such output (outputs: {', '.join(first)})")
        b = self.bound
        if post.task == "classify":
            name = post.output or next(
                (k for k in floats if is_probabilities(first[k]) and first[k].ndim == 2),
                next((k for k in floats if _flat_classes(first[k]) >= 2), None))
            if name is None or _flat_classes(first[name]) < 2:
                raise UsageError("--postprocess classify: no output holds class scores [N, C] "
                                 f"(outputs: {_shapes(first)}); name one with output=NAME")
            classes = _flat_classes(first[name])
            probs = all(is_probabilities(np.asarray(r[name]).reshape(
                np.asarray(r[name]).shape[0], -1)) for r in ref)
            b = replace(b, output=name, classes=classes, softmax=not probs)
            spec.check_classes(classes, f"classifier output {name!r}")
        elif post.task == "detect":
            b = self._bind_detect(b, ref, first)
            spec.check_classes(b.classes, f"detector output {b.output!r}")
        elif post.task == "segment":
            name = post.output or next((k for k in floats if first[k].ndim == 4), None)
            if name is None or first[name].ndim != 4:
                raise UsageError("--postprocess segment: no output holds class scores "
                                 f"[N, C, H, W] (outputs: {_shapes(first)})")
            axis = 1 if segment_layout(first[name]) == "segment" else -1
            b = replace(b, output=name, class_axis=axis,
                        classes=int(first[name].shape[1 if axis == 1 else 3]))
            spec.check_classes(b.classes, f"segmentation output {name!r}")
        else:
            name = post.output or (floats[0] if floats else None)
            if name is None:
                raise UsageError(f"--postprocess embed: no float output (outputs: "
                                 f"{_shapes(first)})")
            b = replace(b, output=name)
        self.bound = b

    def _bind_detect(self, b: Bound, ref: Sequence[Mapping[str, np.ndarray]],
                     first: Mapping[str, np.ndarray]) -> Bound:
        post = b.post
        assert post is not None
        kind = {"yolov8": "detect-yolov8", "yolov5": "detect-yolov5",
                "boxes-scores": "detect-boxes"}[post.layout]
        found: dict[str, OutputMetric] = {
            k: m for k, m in detector_outputs(ref).items() if m.kind == kind}
        name = post.output or next(iter(found), None)
        if name is None or name not in found:
            raise UsageError(f"--postprocess detect:layout={post.layout}: no output has that "
                             f"layout (outputs: {_shapes(first)}); yolov8 is [N, 4+C, A], "
                             "yolov5 [N, A, 5+C], boxes-scores boxes [N, A, 4] with scores "
                             "[N, A, C]")
        m = found[name]
        a = first[name]
        if post.layout == "yolov8":
            classes = int(a.shape[1]) - 4
        elif post.layout == "yolov5":
            classes = int(a.shape[2]) - 5
        else:
            assert m.partner is not None
            sc = first[m.partner]
            classes = int(sc.shape[1] if m.scores_t else sc.shape[2])
        return replace(b, output=name, partner=m.partner, classes=classes, sigmoid=m.sigmoid,
                       boxes_t=m.boxes_t, scores_t=m.scores_t, box_format=m.box_format)

    # ------------------------------------------------------------ data

    def load(self, path: Path, specs: Sequence[edge_sdk.TensorSpec], what: str) -> Samples:
        """Samples for the bare model from ``path``; with an ``image`` array (uint8 RGB),
        the images are kept for the pipeline check and the bare model gets the given
        tensors, else the images through the numpy reference pre-processing. A model
        whose own input is named ``image`` takes its tensors as ``model/image`` next to
        the images (an ``image`` array that is not uint8 RGB is then that input's)."""
        arrays = load_npz(Path(path))
        b = self.bound
        if b is None or self.spec.pre is None or IMAGE_INPUT not in arrays or (
                b.model_input == IMAGE_INPUT and not _raw_images(arrays[IMAGE_INPUT])):
            return samples_from_arrays(arrays, specs, origin=str(path), what=what)
        images = _image_batch(arrays[IMAGE_INPUT], str(path), what)
        name = b.model_input
        key = name if name != IMAGE_INPUT else GIVEN_PREFIX + name
        rest = {k: v for k, v in arrays.items() if k not in (IMAGE_INPUT, key)}
        given: tuple[np.ndarray, ...] | None = None
        if key in arrays:
            given_arr = np.asarray(arrays[key])
            if len(given_arr) != len(images):
                raise UsageError(f"{path}: {len(images)} images but {len(given_arr)} "
                                 f"'{key}' tensors; give one tensor per image")
            given = tuple(given_arr[i:i + 1] for i in range(len(given_arr)))
            rest[name] = given_arr
        else:
            rest[name] = np.concatenate([preprocess(b, im)[name] for im in images])
        samples = samples_from_arrays(rest, specs, origin=str(path), what=what)
        if what == "evaluation" or self.images is None:
            self.images = Images(images, given, str(path))
        return samples

    def data_note(self) -> None:
        if self.images is None:
            return
        self.section["images"] = {"origin": self.images.origin,
                                  "count": len(self.images.images),
                                  "given_tensors": self.images.given is not None}

    # ------------------------------------------------------------ attach and verify

    def attach(self, model_path: Path, work: Path, *, to: str, reference: Reference,
               reference_outputs: Sequence[Mapping[str, np.ndarray]], evalset: Samples,
               output_names: Sequence[str], max_drop: float | None, force: bool,
               skew_budget: float = SKEW_BUDGET) -> Path:
        """Wrap the chosen candidate's ONNX file, convert it to ORT when asked, verify the
        whole pipeline; the file to ship."""
        import onnx

        b = self.bound
        assert b is not None
        model = onnx.load(str(model_path))
        wrapped = wrap(model, b)
        out = work / "pipeline.onnx"
        onnx.save(wrapped, str(out))
        try:
            onnx.checker.check_model(str(out))
        except Exception as err:
            raise ConversionError(f"the wrapped pipeline model is invalid: {one_line(err)}"
                                  ) from err
        if to == "ort":
            from ._normalize import to_ort_format

            ort = work / "pipeline.ort"
            to_ort_format(out, ort)
            out = ort
        try:
            pred = edge_sdk.load(out)
        except Exception as err:
            raise ConversionError(f"the wrapped pipeline model does not load: {one_line(err)}"
                                  ) from err
        if b.pre is None:
            self._verify_post_only(pred, evalset, reference_outputs, output_names, max_drop,
                                   force)
            return out
        imgs = self.images if self.images is not None else self._synthetic()
        self.images = imgs
        self.data_note()
        self.sample = {IMAGE_INPUT: imgs.images[0]}
        self._skew(imgs, model_opset(model), skew_budget, work)
        self._verify(pred, imgs, reference, output_names, max_drop, force)
        self._time(pred)
        return out

    def verified(self) -> bool:
        """Whether the whole pipeline held its budget on real data with no skew."""
        acc = self.section.get("accuracy") or {}
        return bool(acc.get("verified_on_real_data", True))

    def not_verified_why(self) -> str:
        skew = self.section.get("skew") or {}
        acc = self.section.get("accuracy") or {}
        if skew and not skew.get("held", True):
            return "training-serving skew in the pre-processing (see the warnings)"
        if acc and not acc.get("held", True):
            return "the whole pipeline broke its budget; accepted with --force"
        return "synthetic images only; pass --eval with an 'image' array"

    def _synthetic(self) -> Images:
        b = self.bound
        assert b is not None
        rng = np.random.default_rng(0)
        if b.pre is None:
            return Images((), None, "synthetic")
        th, tw = b.size
        ims = tuple(rng.integers(0, 256, (1, max(1, round(th * fy)), max(1, round(tw * fx)), 3),
                                 dtype=np.uint8) for fy, fx in SYNTHETIC_SIZES)
        return Images(ims, None, "synthetic")

    def _skew(self, imgs: Images, opset: int, budget: float, work: Path) -> None:
        """The in-graph pre-processing alone against the numpy reference (always) and
        against the training pipeline's tensors (when given): the report's ``reference``
        and ``skew`` figures."""
        b = self.bound
        assert b is not None and b.pre is not None
        import onnx

        path = work / "preprocess.onnx"
        onnx.save(preprocess_model(b, opset), str(path))
        pre = edge_sdk.load(path)
        made = [np.asarray(next(iter(pre.predict({IMAGE_INPUT: im}).values())), np.float64)
                for im in imgs.images]
        ref = [np.asarray(preprocess(b, im)[b.model_input], np.float64) for im in imgs.images]
        rel, mx, i = _worst_diff(made, ref)
        self.section["reference"] = {"relative_mean_abs_diff": rel, "max_abs_diff": mx,
                                     "worst_sample": i, "budget": budget,
                                     "held": rel <= budget,
                                     "against": "the numpy reference pre-processing"}
        if rel > budget:
            self.warnings.append(
                f"in-graph pre-processing differs from the numpy reference by mean |Δ| "
                f"{rel:.3g} of its spread (budget {budget:.3g}), max |Δ| {mx:.3g} on sample "
                f"{i}: a runtime resize that is not the reference's")
        if imgs.given is None:
            return
        given = []
        for k, (got, t) in enumerate(zip(made, imgs.given, strict=True)):
            if np.asarray(t).size != got.size:
                raise UsageError(f"{imgs.origin}: '{b.model_input}' sample {k} has shape "
                                 f"{list(np.shape(t))}, the pre-processing makes "
                                 f"{list(got.shape)}")
            given.append(np.asarray(t, np.float64).reshape(got.shape))
        rel, mx, i = _worst_diff(made, given)
        held = rel <= budget
        self.section["skew"] = {"relative_mean_abs_diff": rel, "max_abs_diff": mx,
                                "worst_sample": i, "budget": budget, "held": held,
                                "against": f"the given '{b.model_input}' tensors"}
        if not held:
            self.warnings.append(
                f"training-serving skew: in-graph pre-processing differs from the given "
                f"'{b.model_input}' tensors by mean |Δ| {rel:.3g} of their spread (budget "
                f"{budget:.3g}), max |Δ| {mx:.3g} on sample {i}; check --preprocess "
                "(resize, channels, scale, mean, std) against the training pipeline")

    def _verify(self, pred: Any, imgs: Images, reference: Reference,
                output_names: Sequence[str], max_drop: float | None, force: bool) -> None:
        b = self.bound
        assert b is not None
        post = b.post
        got: list[dict[str, np.ndarray]] = []
        want: list[dict[str, np.ndarray]] = []
        for im in imgs.images:
            got.append({k: np.asarray(v) for k, v in pred.predict({IMAGE_INPUT: im}).items()})
            raw = _named(reference(preprocess(b, im)), output_names)
            want.append(postprocess(b, raw, im.shape) if post is not None
                        else {k: np.asarray(v) for k, v in raw.items()})
        figures = compare(b, got, want, max_drop)
        figures["verified_on_real_data"] = bool(imgs.real and figures["held"]
                                                and self.section.get("skew", {}).get("held",
                                                                                    True))
        self._judge(figures, "the whole pipeline (raw images in) disagrees with the "
                    "reference pipeline", force)
        self._batch(pred, imgs, got)

    def _judge(self, figures: dict[str, Any], what: str, force: bool) -> None:
        """Record the pipeline's figures; when they break the budget, refuse the
        conversion, or with ``force`` warn."""
        self.section["accuracy"] = figures
        if not figures["held"]:
            msg = f"{what}: {figures['breaks']}"
            if not force:
                raise ConversionError(msg + " (pass --force to write it anyway)")
            self.warnings.append(msg + " (--force)")

    def _batch(self, pred: Any, imgs: Images, single: Sequence[Mapping[str, np.ndarray]],
               ) -> None:
        """Images of one size run as one batch must get the answers they get one by one
        (within float noise): the batch axis through pre- and post-processing."""
        n = min(len(imgs.images), BATCH_CHECK)
        if n < 2 or isinstance(pred.inputs[0].shape[0], int) or len(
                {im.shape for im in imgs.images[:n]}) != 1:
            return
        out = pred.predict({IMAGE_INPUT: np.concatenate(imgs.images[:n])})
        post = self.spec.post
        if post is not None and post.task == "detect":
            same = all(_same_dets(_dets(out, i), _dets(single[i], 0)) for i in range(n))
        else:
            same = all(_same_answer(np.asarray(out[k])[i:i + 1], np.asarray(single[i][k]))
                       for k in out for i in range(n))
        self.section["batch"] = {"images": n, "same_answers": bool(same)}
        if not same:
            self.warnings.append(f"a batch of {n} images gets other answers than the same "
                                 "images one by one; run images one at a time")

    def _verify_post_only(self, pred: Any, evalset: Samples,
                          reference: Sequence[Mapping[str, np.ndarray]],
                          output_names: Sequence[str], max_drop: float | None,
                          force: bool) -> None:
        """Post-processing without pre-processing: the wrapped model on the bare model's
        evaluation feeds against the source's outputs through the numpy post."""
        b = self.bound
        assert b is not None and b.post is not None
        real = evalset.real
        self.section["images"] = {"origin": evalset.origin, "count": len(evalset),
                                  "given_tensors": True}
        got = [{k: np.asarray(v) for k, v in pred.predict(dict(f)).items()}
               for f in evalset.feeds]
        want = [postprocess(b, _named(r, output_names), None) for r in reference]
        figures = compare(b, got, want, max_drop)
        figures["verified_on_real_data"] = bool(real and figures["held"])
        self._judge(figures, "the model with in-graph post-processing disagrees with the "
                    "reference", force)

    def _time(self, pred: Any) -> None:
        if self.sample is None:
            return
        runs = []
        for _ in range(TIMED_RUNS):
            t0 = time.perf_counter()
            pred.predict(dict(self.sample))
            runs.append((time.perf_counter() - t0) * 1e3)
        self.section["latency_ms"] = float(np.median(runs))

    # ------------------------------------------------------------ what the artifact says

    def manifest(self) -> dict[str, Any]:
        """The manifest's ``preprocess``, ``postprocess``, ``labels``, ``answers`` and
        ``pipeline`` entries."""
        out: dict[str, Any] = {}
        b = self.bound
        if self.spec.pre is not None and b is not None:
            out["preprocess"] = {**self.spec.pre.to_json(), "size": list(b.size),
                                 "layout": b.layout, "feeds": b.model_input}
        if self.spec.post is not None and b is not None:
            out["postprocess"] = {**self.spec.post.to_json(), "reads": b.output,
                                  **({"softmax_added": b.softmax}
                                     if self.spec.post.task == "classify" else {}),
                                  **({"sigmoid_added": b.sigmoid}
                                     if self.spec.post.task == "detect" else {}),
                                  "classes": b.classes or None}
            out["answers"] = b.outputs_meaning()
        if self.spec.labels is not None:
            out["labels"] = list(self.spec.labels)
        if self.section:
            out["pipeline"] = {k: v for k, v in self.section.items()
                               if k in ("accuracy", "reference", "skew", "images",
                                        "batch", "latency_ms")}
        return out

    def report_lines(self) -> list[str]:
        return pipeline_lines({"pipeline": self.section})


# ---------------------------------------------------------------- comparison

def compare(b: Bound, got: Sequence[Mapping[str, np.ndarray]],
            want: Sequence[Mapping[str, np.ndarray]], max_drop: float | None) -> dict[str, Any]:
    """The pipeline's answers vs the reference's, in the task's terms, with the task's
    budget (``max_drop`` replaces the main one)."""
    post = b.post
    if post is None:
        return _compare_tensors(got, want)
    if post.task == "classify":
        a = np.concatenate([g["class_ids"] for g in got])
        r = np.concatenate([w["class_ids"] for w in want])
        agree = float(np.mean(a[:, 0] == r[:, 0]))
        k = a.shape[1]
        overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, r, strict=True)]))
        sd = float(np.max(np.abs(np.concatenate([g["scores"] for g in got])
                                 - np.concatenate([w["scores"] for w in want]))))
        budget = BUDGETS["top1"].main if max_drop is None else max_drop
        drop = 1.0 - agree
        breaks = [] if drop <= budget else [f"top-1 label agreement {agree:.4g} < "
                                            f"{1 - budget:.4g}"]
        return {"task": "classify", "top1_agreement": agree, f"top{k}_overlap": overlap,
                "max_score_change": sd, "budget": budget, "held": not breaks,
                "breaks": "; ".join(breaks),
                "summary": f"top-1 labels agree {agree:.2%}, top-{k} overlap {overlap:.2%}, "
                           f"max score change {sd:.3g}"}
    if post.task == "detect":
        cfg = DetectConfig(score_threshold=post.score, nms_iou=post.iou,
                           max_detections=post.max)
        matched = total = changed = 0
        worst = 0.0
        shift = 0.0
        for g, w in zip(got, want, strict=True):
            for img in np.unique(np.concatenate([g["batch_index"], w["batch_index"]])):
                dg, dw = _dets(g, img), _dets(w, img)
                m, t = match_detections(dw, dg, cfg)
                changed += class_changes(dw, dg, cfg)
                matched, total = matched + m, total + t
                worst = max(worst, 1.0 - (m / t if t else 1.0))
                shift = max(shift, _box_shift(dw, dg))
        share = matched / total if total else 1.0
        bud = BUDGETS["detect"]
        main = bud.main if max_drop is None else max_drop
        breaks = []
        if not 1.0 - share <= main:
            breaks.append(f"detections matched {share:.4g} < {1 - main:.4g}")
        if bud.sample is not None and not worst <= bud.sample:
            breaks.append(f"an image lost {worst:.3g} of its detections (> {bud.sample:.3g})")
        return {"task": "detect", "matched_share": share, "detections": total,
                "class_changed": changed, "worst_image_unmatched": worst,
                "max_box_shift_px": shift, "budget": main, "held": not breaks,
                "breaks": "; ".join(breaks),
                "summary": f"detections matched by IoU and class {share:.2%} of {total}, "
                           f"boxes within {shift:.3g} px"}
    if post.task == "segment":
        a = np.concatenate([g["class_map"].reshape(-1) for g in got])
        r = np.concatenate([w["class_map"].reshape(-1) for w in want])
        ious = []
        for k in np.union1d(np.unique(a), np.unique(r)):
            inter, union = np.sum((a == k) & (r == k)), np.sum((a == k) | (r == k))
            ious.append(inter / union if union else 1.0)
        miou = float(np.mean(ious)) if ious else 1.0
        pix = float(np.mean(a == r)) if a.size else 1.0
        main = BUDGETS["segment"].main if max_drop is None else max_drop
        breaks = [] if 1.0 - miou <= main else [f"mean IoU {miou:.4g} < {1 - main:.4g}"]
        return {"task": "segment", "mean_iou": miou, "pixel_agreement": pix, "budget": main,
                "held": not breaks, "breaks": "; ".join(breaks),
                "summary": f"class maps: mean IoU {miou:.4f}, pixels agree {pix:.2%}"}
    s = score_cosine([g["embedding"] for g in got], [w["embedding"] for w in want])
    bud = BUDGETS["cosine"]
    main = bud.main if max_drop is None else max_drop
    _, worst_c = s.worst()
    breaks = [] if s.drop <= main else [f"mean cosine {s.score:.4g} < {1 - main:.4g}"]
    if bud.sample is not None and worst_c > bud.sample:
        breaks.append(f"a sample's cosine {1 - worst_c:.4g} < {1 - bud.sample:.4g}")
    return {"task": "embed", "mean_cosine": s.score, "budget": main, "held": not breaks,
            "breaks": "; ".join(breaks), "summary": f"embeddings: mean cosine {s.score:.5f}"}


def _compare_tensors(got: Sequence[Mapping[str, np.ndarray]],
                     want: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Pre-processing only: the model's outputs, by the generic cosine."""
    names = list(want[0])
    gs = [dict(zip(names, g.values(), strict=True)) for g in got]
    s = score_cosine([np.concatenate([np.ravel(g[k]) for k in names]) for g in gs],
                     [np.concatenate([np.ravel(w[k]) for k in names]) for w in want])
    budget = default_max_drop("cosine", want)
    held = s.drop <= budget
    return {"task": "generic", "mean_cosine": s.score, "budget": budget, "held": held,
            "breaks": "" if held else f"mean cosine {s.score:.4g} < {1 - budget:.4g}",
            "summary": f"outputs: mean cosine {s.score:.5f}"}


def _same_answer(a: np.ndarray, b: np.ndarray) -> bool:
    """Float answers within noise; class ids or maps agreeing on 99 % (a near tie may
    flip with the batch's kernels)."""
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "i":
        return float(np.mean(a == b)) >= 0.99 if a.size else True
    return bool(np.allclose(a, b, atol=1e-4))


def _same_dets(a: np.ndarray, b: np.ndarray) -> bool:
    """The same detections, in the same order, within float noise."""
    return a.shape == b.shape and bool(np.allclose(a, b, atol=1e-3))


def _worst_diff(got: Sequence[np.ndarray], want: Sequence[np.ndarray],
                ) -> tuple[float, float, int]:
    """The worst sample's mean |got - want| relative to want's spread, its max |Δ|, and
    its index."""
    worst = (0.0, 0.0, 0)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        d = np.abs(g - w)
        rel = float(np.mean(d)) / (float(np.std(w)) + 1e-12)
        if rel > worst[0] or i == 0:
            worst = (rel, float(np.max(d)), i)
    return worst


def _dets(out: Mapping[str, np.ndarray], img: int) -> np.ndarray:
    """One image's detections as ``[K, 6]`` rows; boxes grown by half a pixel each side so
    that a box clipped flat at the image border still matches its twin by IoU."""
    sel = np.asarray(out["batch_index"]) == img
    grow = np.array([-0.5, -0.5, 0.5, 0.5])
    return np.concatenate([np.asarray(out["boxes"], np.float64)[sel].reshape(-1, 4) + grow,
                           np.asarray(out["scores"], np.float64)[sel][:, None],
                           np.asarray(out["class_ids"], np.float64)[sel][:, None]], axis=1)


def _box_shift(ref: np.ndarray, got: np.ndarray) -> float:
    """The largest corner distance between each reference box and the same-class box
    nearest to it."""
    worst = 0.0
    for d in ref:
        same = got[got[:, 5] == d[5]]
        if len(same):
            worst = max(worst, float(np.min(np.max(np.abs(same[:, :4] - d[:4]), axis=1))))
    return worst


def refuse_framework_images(options: Any, kind: str) -> None:
    """A framework source's front-end reads --eval/--calibration as the model's input
    tensors (export shapes, the export check) before any pre-processing exists, so raw
    images there are refused with what works instead."""
    if options.preprocess is None:
        return
    for flag, path in (("--eval", options.eval), ("--calibration", options.calibration)):
        if path is not None and Path(path).is_file() and str(path).endswith(".npz"):
            arrays = load_npz(Path(path))
            if _raw_images(arrays.get(IMAGE_INPUT)):
                raise UsageError(
                    f"{flag} {path}: raw '{IMAGE_INPUT}' images with a {kind} source are not "
                    "supported yet (its export reads the model's input tensors); give the "
                    "tensors here, or export to ONNX first and convert that with the images")


def _raw_images(a: Any) -> bool:
    """An array of uint8 RGB images ``[N, H, W, 3]`` (or one ``[H, W, 3]``)."""
    if a is None:
        return False
    arr = np.asarray(a)
    return arr.dtype == np.uint8 and arr.ndim in (3, 4) and arr.shape[-1] == 3


def _image_batch(a: Any, origin: str, what: str) -> tuple[np.ndarray, ...]:
    arr = np.asarray(a)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or not len(arr):
        raise UsageError(f"{origin}: {what} '{IMAGE_INPUT}' must be uint8 RGB images "
                         f"[N, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return tuple(arr[i:i + 1] for i in range(len(arr)))


def _named(out: Mapping[str, Any], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The source's outputs under the ONNX model's output names (frameworks may name
    them differently; they come in the same order)."""
    d = {k: np.asarray(v) for k, v in out.items()}
    if all(k in d for k in names) or len(d) != len(names):
        return d
    return dict(zip(names, d.values(), strict=True))


def _flat_classes(a: np.ndarray) -> int:
    """Classes of a ``[N, C]`` (or ``[N, C, 1, 1]``) score output, else 0."""
    if a.dtype.kind != "f" or a.ndim < 2:
        return 0
    rest = a.shape[1:]
    big = [d for d in rest if d != 1]
    return int(big[0]) if len(big) == 1 else (1 if not big else 0)


def _shapes(first: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {list(np.shape(v))}" for k, v in first.items())


__all__ = ["Images", "Prepost", "compare", "refuse_framework_images"]
