"""Front-end bench: each framework source through `edge-sdk convert --quantize auto`,
compared with that framework's plain float export, measured side by side in one run.

For every front-end it builds a small but not trivial model, converts it with
calibration data, then times the plain float export (torch.onnx.export run in
onnxruntime; tf2onnx; TensorFlow's float32 TFLite; skl2onnx) and the artifact's
model in one interleaved measurement (batch 1), and prints:

- size ratio and latency ratio of the artifact vs the float export,
- accuracy vs the framework's own predict on a held-out third of the data (not
  used for calibration): cosine of the outputs and top-1 (label) agreement.

    .venv/bin/python bench/frontends.py [--threads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters import convert
from converters._data import load_samples
from converters._frontends._child import FrameworkChild
from converters._frontends._common import quiet
from converters._measure import MeasureConfig, measure_candidates
from edge_sdk import load
from tests._child import in_child


def torch_cnn(d: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    import torch

    torch.manual_seed(0)
    layers: list[Any] = []
    ch = 3
    for out, stride in ((32, 2), (64, 2), (128, 2), (128, 1), (256, 2)):
        layers += [torch.nn.Conv2d(ch, out, 3, padding=1, stride=stride),
                   torch.nn.BatchNorm2d(out), torch.nn.ReLU()]
        ch = out
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(ch, 10)).eval()
    x = np.random.default_rng(0).normal(0, 1, (96, 3, 64, 64)).astype(np.float32)
    src = d / "cnn.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    with quiet():
        ep = torch.export.export(model, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: batch},))
        torch.export.save(ep, str(src))
    return src, *_split(d, "cnn", {"input": x}), {}


def torch_mlp(d: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10)).eval()
    x = np.random.default_rng(0).normal(0, 1, (128, 256)).astype(np.float32)
    src = d / "mlp.pt"
    with quiet():
        torch.jit.save(torch.jit.trace(model, torch.from_numpy(x[:2])), str(src))
    return src, *_split(d, "mlp", {"input": x}), {}


def keras_cnn(d: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((64, 64, 3), name="image")
    h = inp
    for f, s in ((32, 2), (64, 2), (128, 2), (128, 1), (256, 2)):
        h = keras.layers.Conv2D(f, 3, strides=s, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).uniform(0, 1, (96, 64, 64, 3)).astype(np.float32)
    src = d / "kcnn.keras"
    model.save(str(src))
    return src, *_split(d, "kcnn", {"image": x}), {}


def sklearn_forest(d: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    import joblib
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    x, y = make_classification(2000, 20, n_informative=10, n_classes=4, random_state=0)
    x = x.astype(np.float32)
    est = RandomForestClassifier(100, max_depth=10, random_state=0).fit(x[:1600], y[:1600])
    src = d / "forest.joblib"
    joblib.dump(est, src)
    return src, *_split(d, "forest", {"input": x[1600:], "labels": y[1600:]}), \
        {"trust_pickle": True}


def sklearn_pipeline(d: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    import joblib
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = make_classification(2000, 20, n_informative=10, n_classes=4, random_state=1)
    x = x.astype(np.float32)
    est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[:1600],
                                                                                y[:1600])
    src = d / "pipeline.joblib"
    joblib.dump(est, src)
    return src, *_split(d, "pipeline", {"input": x[1600:], "labels": y[1600:]}), \
        {"trust_pickle": True}


def _split(d: Path, stem: str, arrays: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """The first two thirds as calibration data, the last third as the evaluation set."""
    n = len(next(iter(arrays.values())))
    k = (2 * n) // 3
    calib, evalf = d / f"{stem}.npz", d / f"{stem}-eval.npz"
    np.savez(calib, **{name: a[:k] for name, a in arrays.items()})
    np.savez(evalf, **{name: a[k:] for name, a in arrays.items()})
    return calib, evalf


def _open(child: FrameworkChild, kind: str, src: Path, calib: Path, work: Path) -> None:
    child.call("open", kind=kind, src=str(src), work=str(work),
               calibration=calib if kind == "torch" else None, input_shapes=None,
               trust_pickle=kind == "sklearn")


def float_export(kind: str, src: Path, calib: Path, d: Path, to: str) -> Path:
    """The framework's plain float export, made with the same exporter the front-end uses
    but without the pipeline (no normalization, optimization or quantization). Like the
    converter, the framework runs in a child interpreter."""
    work = d / f"plain-{src.stem}-{to}"
    work.mkdir(exist_ok=True)
    with FrameworkChild(kind, work, timeout_s=1800) as child:
        _open(child, kind, src, calib, work)
        if kind == "keras" and to != "onnx":
            (cand,) = child.call("tflite_candidates", work=str(work), schemes=["none"],
                                 calibration=None, max_calibration_samples=0)
            assert cand.path is not None
            return Path(cand.path)
        return Path(child.call("export", path=str(work / "plain.onnx")))


def reference_outputs(
    kind: str, src: Path, calib: Path, d: Path, feeds: list[dict[str, np.ndarray]]
) -> list[dict[str, Any]]:
    """The framework's own predictions on ``feeds``."""
    work = d / f"ref-{src.stem}"
    work.mkdir(exist_ok=True)
    with FrameworkChild(kind, work, timeout_s=1800) as child:
        _open(child, kind, src, calib, work)
        return [child.call("reference", feed=f) for f in feeds]


def top1(outs: list[dict[str, np.ndarray]], refs: list[dict[str, Any]]) -> float:
    agree = []
    for o, r in zip(outs, refs, strict=True):
        for k, v in r.items():
            v = np.asarray(v)
            got = np.asarray(o[k]).reshape(v.shape)
            if v.dtype.kind in "iu":
                agree.append(float(np.mean(got == v)))
                break
            if v.ndim >= 1 and v.shape[-1] >= 2:
                agree.append(float(np.mean(got.argmax(-1) == v.argmax(-1))))
                break
    return float(np.mean(agree)) if agree else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    cases = [
        ("torch CNN (.pt2)", "torch", torch_cnn, "onnx"),
        ("torch MLP (TorchScript)", "torch", torch_mlp, "onnx"),
        ("Keras CNN → ONNX", "keras", keras_cnn, "onnx"),
        ("Keras CNN → TFLite", "keras", keras_cnn, "tflite"),
        ("sklearn RandomForest", "sklearn", sklearn_forest, "onnx"),
        ("sklearn Scaler+LogReg", "sklearn", sklearn_pipeline, "onnx"),
        ("TFLite in (float32)", "tflite", keras_cnn, "tflite-in"),
    ]
    cfg = MeasureConfig(rounds=args.rounds, runs_per_round=30, warmup=10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        built: dict[str, tuple[Path, Path, Path, dict[str, Any]]] = {}
        for label, kind, builder, to in cases:
            key = builder.__name__
            if key not in built:
                # Built in a child: torch and TensorFlow must not share this process.
                built[key] = in_child(f"bench.frontends:{key}", d)
            src, calib, evalf, extra = built[key]
            out = d / f"art-{key}-{to}"
            if kind == "tflite":
                plain = float_export("keras", src, calib, d, "tflite-in")
                res = convert(plain, out, threads=args.threads, eval=evalf)
                refs_given = False
            else:
                res = convert(src, out, to=to, calibration=calib, eval=evalf,
                              threads=args.threads, trust_pickle=extra.get("trust_pickle", False))
                plain = float_export(kind, src, calib, d, to)
                refs_given = True
            art = res.artifact
            specs = load(art.path).inputs
            samples = load_samples(evalf, specs, what="evaluation")
            feeds = [dict(f) for f in samples.feeds]
            refs = (reference_outputs(kind, src, calib, d, feeds) if refs_given
                    else [load(plain).predict(f) for f in feeds])
            ms = measure_candidates(
                [("float", plain, "none"), ("artifact", art.model_path,
                                            art.manifest.quantization)],
                feeds, refs, metric="cosine", threads=args.threads, config=cfg)
            base, chosen = ms
            assert base.latency_ms and chosen.latency_ms and chosen.accuracy
            outs = [load(art.path).predict(f) for f in feeds]
            rows.append((label, res.chosen, base.size_bytes, chosen.size_bytes,
                         chosen.size_bytes / base.size_bytes, base.latency_ms,
                         chosen.latency_ms, chosen.latency_ms / base.latency_ms,
                         chosen.accuracy.score, top1(outs, refs)))
    head = (f"{'front-end':<24} {'chosen':<22} {'float KiB':>9} {'art KiB':>8} {'×size':>6} "
            f"{'float ms':>9} {'art ms':>8} {'×lat':>6} {'cosine':>8} {'top1':>6}")
    print(f"threads={args.threads or 'default'} cpu={os.cpu_count()} rounds={args.rounds} "
          "(batch 1, p50, interleaved)")
    print(head)
    for r in rows:
        print(f"{r[0]:<24} {r[1]:<22} {r[2] / 1024:>9.1f} {r[3] / 1024:>8.1f} {r[4]:>6.2f} "
              f"{r[5]:>9.3f} {r[6]:>8.3f} {r[7]:>6.2f} {r[8]:>8.5f} {r[9]:>6.3f}")


if __name__ == "__main__":
    main()
