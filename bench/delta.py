"""Delta updates: delta size over full size, device apply cost, and bytes over MQTT.

Builds two float ONNX models (a ~17 MB CNN and a ~21 MB transformer encoder, random
weights, onnx.helper), converts v1, makes v2 by retraining and re-converts it, then
builds the release delta between the two artifacts as ``release add`` would. In one run:

- (a) head-only retrain (only the last layer changes), int8, converted with ``--base``;
- (b) full fine-tune (every weight moves by ``--lr`` of its spread), int8, with ``--base``,
      and (b') a large-learning-rate retrain (10x) the same way;
- (c) the same fine-tune as (b), int8, converted without ``--base`` (own scales);
- (d) the same fine-tune as (b), float32 artifact (lossless);
- apply on the device side in a fresh interpreter (as the agent does: delta file and
  base file on disk, output streamed to disk): wall time and peak extra RSS, for each
  case and for a ~100 MB float model;
- bytes the responder sent over a private Mosquitto for a v1 → v2 update of case (b),
  fetched by the device's real UpdateClient with and without the base held.

Goals (issue 13): head-only ≤ 0.02; int8 fine-tune with --base ≤ 0.05 (≤ 0.2 for the
large retrain); float32 fine-tune ≤ 0.55 (d; d' is the large retrain, for scale); apply
peak extra memory ≤ 8 MiB + one frame at any size and ≤ 2 s per 100 MB.

    .venv/bin/python bench/delta.py [--lr 0.002] [--skip-mqtt] [--only cnn|encoder]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import edge_sdk  # noqa: E402
from converters import ConvertConfig, convert  # noqa: E402
from edge_sdk.delta import build_delta  # noqa: E402

Weights = dict[str, np.ndarray]
OPSET = 17


# -- models --------------------------------------------------------------------------------

#: A task head of 100 classes: 1.2 % of the CNN's weights (ResNet-18's 1000-class head is
#: 4.4 %; a head-only retrain can never ship less than the head).
CLASSES = 100


def cnn_weights(rng: np.random.Generator) -> Weights:
    chans = [3, 64, 128, 256, 512, 512]
    w: Weights = {}
    for i, (a, b) in enumerate(itertools.pairwise(chans)):
        w[f"conv{i}.w"] = rng.standard_normal((b, a, 3, 3)).astype(np.float32) * \
            np.float32(np.sqrt(2 / (a * 9)))
        w[f"conv{i}.b"] = np.zeros(b, np.float32)
    w["head.w"] = rng.standard_normal((512, CLASSES)).astype(np.float32) * np.float32(0.04)
    w["head.b"] = np.zeros(CLASSES, np.float32)
    return w


def cnn_model(w: Weights, path: Path) -> Path:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])
    nodes, prev = [], "image"
    for i in range(5):
        nodes += [helper.make_node("Conv", [prev, f"conv{i}.w", f"conv{i}.b"], [f"c{i}"],
                                   pads=[1, 1, 1, 1], strides=[2, 2]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev = f"r{i}"
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "head.w", "head.b"], ["logits"])]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    g = helper.make_graph(nodes, "cnn", [x], [y], inits)
    return _save(g, path)


D, FF, LAYERS, VOCAB, SEQ = 256, 1024, 4, 8000, 32


def encoder_weights(rng: np.random.Generator) -> Weights:
    w: Weights = {"embed": rng.standard_normal((VOCAB, D)).astype(np.float32) * 0.05}
    for i in range(LAYERS):
        for n, shape in (("q", (D, D)), ("k", (D, D)), ("v", (D, D)), ("o", (D, D)),
                         ("f1", (D, FF)), ("f2", (FF, D))):
            w[f"l{i}.{n}"] = rng.standard_normal(shape).astype(np.float32) * \
                np.float32(1 / np.sqrt(shape[0]))
        w[f"l{i}.g1"] = np.ones(D, np.float32)
        w[f"l{i}.b1"] = np.zeros(D, np.float32)
        w[f"l{i}.g2"] = np.ones(D, np.float32)
        w[f"l{i}.b2"] = np.zeros(D, np.float32)
    w["head.w"] = rng.standard_normal((D, 16)).astype(np.float32) * np.float32(0.06)
    return w


def encoder_model(w: Weights, path: Path) -> Path:
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, SEQ])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, SEQ, 16])
    scale = numpy_helper.from_array(np.array(1 / np.sqrt(D), np.float32), "scale")
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h0"])]
    h = "h0"
    for i in range(LAYERS):
        p = f"l{i}."
        nodes += [
            helper.make_node("MatMul", [h, p + "q"], [p + "Q"]),
            helper.make_node("MatMul", [h, p + "k"], [p + "K"]),
            helper.make_node("MatMul", [h, p + "v"], [p + "V"]),
            helper.make_node("Transpose", [p + "K"], [p + "Kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [p + "Q", p + "Kt"], [p + "S"]),
            helper.make_node("Mul", [p + "S", "scale"], [p + "Ss"]),
            helper.make_node("Softmax", [p + "Ss"], [p + "A"], axis=-1),
            helper.make_node("MatMul", [p + "A", p + "V"], [p + "C"]),
            helper.make_node("MatMul", [p + "C", p + "o"], [p + "O"]),
            helper.make_node("Add", [h, p + "O"], [p + "R1"]),
            helper.make_node("LayerNormalization", [p + "R1", p + "g1", p + "b1"], [p + "N1"],
                             axis=-1),
            helper.make_node("MatMul", [p + "N1", p + "f1"], [p + "F1"]),
            helper.make_node("Relu", [p + "F1"], [p + "F1r"]),
            helper.make_node("MatMul", [p + "F1r", p + "f2"], [p + "F2"]),
            helper.make_node("Add", [p + "N1", p + "F2"], [p + "R2"]),
            helper.make_node("LayerNormalization", [p + "R2", p + "g2", p + "b2"], [p + "N2"],
                             axis=-1),
        ]
        h = p + "N2"
    nodes.append(helper.make_node("MatMul", [h, "head.w"], ["logits"]))
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()] + [scale]
    g = helper.make_graph(nodes, "encoder", [ids], [y], inits)
    return _save(g, path)


def _save(g: onnx.GraphProto, path: Path) -> Path:
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def head_retrain(w: Weights, rng: np.random.Generator) -> Weights:
    out = dict(w)
    out["head.w"] = rng.standard_normal(w["head.w"].shape).astype(np.float32) * \
        np.float32(w["head.w"].std())
    return out


def fine_tune(w: Weights, rng: np.random.Generator, lr: float, decay: float = 0.02,
              ) -> Weights:
    """Every weight moves by ``lr`` of its tensor's spread, and the largest weight of each
    slice along the first and the last axis shrinks by ``decay`` (weight decay on the
    outliers): what moves quantization ranges in a real fine-tune."""
    out = {}
    for k, v in w.items():
        n = v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(lr * (v.std() or 1))
        for axis in sorted({0, v.ndim - 1}) if v.ndim >= 2 else ():
            m = np.moveaxis(n, axis, 0).copy()
            flat = m.reshape(m.shape[0], -1)
            j = np.abs(flat).argmax(axis=1)
            flat[np.arange(flat.shape[0]), j] *= np.float32(1 - decay)
            n = np.moveaxis(flat.reshape(m.shape), 0, axis)
        out[k] = np.ascontiguousarray(n, dtype=np.float32)
    return out


# -- measurements ----------------------------------------------------------------------------

def convert_to(src: Path, out: Path, calib: Path, scheme: str, base: Path | None) -> Path:
    extra = {"base": base} if base is not None else {}
    res = convert(src, out, quantize=scheme, calibration=calib, name="m",
                  version=out.name, overwrite=True, force=True, config=ConvertConfig(),
                  **extra)
    return Path(res.artifact.path)


def model_file(art_dir: Path) -> bytes:
    return edge_sdk.Artifact.from_dir(art_dir).model_path.read_bytes()


def delta_ratio(v1: Path, v2: Path) -> tuple[float, int, int, str]:
    a, b = edge_sdk.Artifact.from_dir(v1), edge_sdk.Artifact.from_dir(v2)
    d = build_delta(a.model_path.read_bytes(), b.model_path.read_bytes(),
                    fmt=a.manifest.format)
    if d is None:
        return float("nan"), 0, b.manifest.size_bytes, "none"
    return d.ratio, d.size, b.manifest.size_bytes, d.method


_APPLY = r"""
import json, os, sys, threading, time
from edge_sdk.delta import apply_delta
delta, base, out, base_sha, sha, n = sys.argv[1:7]
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak = before = rss()
done = threading.Event()
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, rss())
        time.sleep(0.0005)
t = threading.Thread(target=sample)
t.start()
t0 = time.perf_counter()
with open(delta, "rb") as d, open(base, "rb") as b, open(out, "wb") as o:
    apply_delta(d, b, o, base_sha256=base_sha, target_sha256=sha, target_length=int(n))
dt = time.perf_counter() - t0
done.set()
t.join()
print(json.dumps({"s": dt, "extra": max(peak, rss()) - before}))
"""


def apply_cost(base: bytes, target: bytes, fmt: str | None, tmp: Path) -> tuple[float, float]:
    """(seconds, peak extra MiB) of applying the delta in a fresh interpreter: resident
    memory sampled every 0.5 ms against what the interpreter held just before."""
    import hashlib

    d = build_delta(base, target, fmt=fmt)
    assert d is not None
    (tmp / "d").write_bytes(d.data)
    (tmp / "b").write_bytes(base)
    res = subprocess.run(
        [sys.executable, "-c", _APPLY, str(tmp / "d"), str(tmp / "b"), str(tmp / "o"),
         hashlib.sha256(base).hexdigest(), hashlib.sha256(target).hexdigest(),
         str(len(target))], capture_output=True, text=True, cwd=ROOT, check=True)
    got = json.loads(res.stdout)
    return float(got["s"]), got["extra"] / (1 << 20)


def mqtt_bytes(v1: Path, v2: Path, tmp: Path) -> tuple[int, int]:
    """Bytes the responder sent to update v1 → v2 with the base held, and without."""
    from edge_sdk.release import Repository, create_deployment
    from edge_sdk.transport import MqttConfig, MqttConnection, RepoResponder
    from edge_sdk.trust import LocalModel, UpdateClient, load_public_key, verify_deployment
    from tests._broker import Mosquitto

    repo = Repository.init(tmp / "repo", tmp / "keys")
    repo.add_artifact(v1)
    repo.add_artifact(v2)
    key = load_public_key(repo.deployment_key_path)
    v2_version = edge_sdk.Artifact.from_dir(v2).manifest.version
    held = edge_sdk.Artifact.from_dir(v1)
    sent = []
    with Mosquitto(tmp / "broker") as broker:
        cfg = MqttConfig(url=broker.url, fleet="bench")
        with MqttConnection(cfg, name="host") as host, RepoResponder(host, repo.path) as resp:
            for i, have in enumerate(([LocalModel(held.model_path, held.manifest.sha256)], [])):
                sd = create_deployment(repo, model="m", fleet="bench", version=v2_version,
                                       devices=[f"d{i}"])
                dep = verify_deployment(sd.document, key, device_id=f"d{i}", fleet="bench")
                with MqttConnection(cfg, name=f"d{i}") as conn:
                    client = UpdateClient(
                        trusted_root=repo.root_path.read_bytes(),
                        metadata_dir=tmp / f"d{i}" / "tuf", partial_dir=tmp / f"d{i}" / "part",
                        connection=conn, device_id=f"d{i}")
                    before = resp.stats.bytes_sent
                    client.fetch(dep, tmp / f"d{i}" / "out", have=have)
                    assert client.last_download is not None
                    assert client.last_download.kind == ("delta" if have else "full")
                    sent.append(resp.stats.bytes_sent - before)
    return sent[0], sent[1]


# -- the run ---------------------------------------------------------------------------------

def family(name: str, weights: Callable[[np.random.Generator], Weights],
           build: Callable[[Weights, Path], Path], calib: dict[str, np.ndarray],
           scheme: str, lr: float, tmp: Path, rows: list[list[str]],
           applies: list[list[str]]) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    w1 = weights(rng)
    cal = tmp / f"{name}-calib.npz"
    np.savez(cal, **calib)
    src = {"v1": build(w1, tmp / f"{name}-v1.onnx"),
           "head": build(head_retrain(w1, rng), tmp / f"{name}-head.onnx"),
           "ft": build(fine_tune(w1, rng, lr), tmp / f"{name}-ft.onnx"),
           "big": build(fine_tune(w1, rng, lr * 10), tmp / f"{name}-big.onnx")}
    out = tmp / name
    t0 = time.perf_counter()
    v1 = convert_to(src["v1"], out / "1.0.0", cal, scheme, None)
    cases = [("a", "head-only retrain, --base", src["head"], scheme, v1, v1),
             ("b", f"fine-tune lr {lr:g}, --base", src["ft"], scheme, v1, v1),
             ("b'", f"retrain lr {lr * 10:g}, --base", src["big"], scheme, v1, v1),
             ("c", f"fine-tune lr {lr:g}, no --base", src["ft"], scheme, None, v1)]
    arts: dict[str, Path] = {}
    for i, (tag, what, s, sch, base, v1_art) in enumerate(cases):
        v2 = convert_to(s, out / f"2.0.{i}", cal, sch, base)
        arts[tag] = v2
        ratio, size, full, method = delta_ratio(v1_art, v2)
        rows.append([name, f"({tag}) {what}", sch, f"{full / 1e6:.1f}", f"{size / 1e3:.0f}",
                     f"{ratio:.3f}", method])
    f1 = convert_to(src["v1"], out / "f1.0.0", cal, "none", None)
    f2 = convert_to(src["ft"], out / "f2.0.0", cal, "none", None)
    ratio, size, full, method = delta_ratio(f1, f2)
    rows.append([name, f"(d) fine-tune lr {lr:g}, float32", "none", f"{full / 1e6:.1f}",
                 f"{size / 1e3:.0f}", f"{ratio:.3f}", method])
    f3 = convert_to(src["big"], out / "f3.0.0", cal, "none", None)
    ratio, size, full, method = delta_ratio(f1, f3)
    rows.append([name, f"(d') retrain lr {lr * 10:g}, float32", "none", f"{full / 1e6:.1f}",
                 f"{size / 1e3:.0f}", f"{ratio:.3f}", method])
    print(f"  {name}: conversions took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for tag, v2 in (("b", arts["b"]), ("d", f2)):
        base_dir = v1 if tag == "b" else f1
        fmt = edge_sdk.Artifact.from_dir(base_dir).manifest.format
        s, mib = apply_cost(model_file(base_dir), model_file(v2), fmt, tmp)
        applies.append([name, f"({tag})", f"{len(model_file(v2)) / 1e6:.1f}", f"{s:.3f}",
                        f"{mib:.1f}"])
    return v1, arts["b"]


def big_apply(tmp: Path, mb: int, applies: list[list[str]]) -> None:
    from tests._models import weighted_offset_model

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, mb * (1 << 20) // 16)).astype(np.float32)
    a = weighted_offset_model(tmp / "big1.onnx", 1.0, w).read_bytes()
    w2 = w + rng.standard_normal(w.shape).astype(np.float32) * np.float32(0.002)
    b = weighted_offset_model(tmp / "big2.onnx", 1.0, w2).read_bytes()
    s, mib = apply_cost(a, b, "onnx", tmp)
    applies.append([f"float {len(b) / 1e6:.0f} MB", "(d)", f"{len(b) / 1e6:.1f}", f"{s:.3f}",
                    f"{mib:.1f}"])


def table(rows: list[list[str]], head: list[str]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr", type=float, default=0.001,
                    help="fine-tune step as a fraction of each weight's spread")
    ap.add_argument("--skip-mqtt", action="store_true")
    ap.add_argument("--only", choices=["cnn", "encoder"])
    ap.add_argument("--big-mb", type=int, default=100)
    args = ap.parse_args()
    rows: list[list[str]] = []
    applies: list[list[str]] = []
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory(prefix="edge-delta-bench-") as t:
        tmp = Path(t)
        pair = None
        if args.only in (None, "cnn"):
            pair = family("cnn", cnn_weights, cnn_model,
                          {"image": rng.standard_normal((16, 3, 64, 64)).astype(np.float32)},
                          "int8-static", args.lr, tmp, rows, applies)
        if args.only in (None, "encoder"):
            family("encoder", encoder_weights, encoder_model,
                   {"ids": rng.integers(0, VOCAB, (16, SEQ)).astype(np.int64)},
                   "int8-dynamic", args.lr, tmp, rows, applies)
        big_apply(tmp, args.big_mb, applies)
        print("\ndelta / full artifact (goals: (a) <= 0.02, (b) <= 0.05, (b') <= 0.2, "
              "(d) <= 0.55)")
        table(rows, ["model", "case", "scheme", "full MB", "delta KB", "ratio", "method"])
        print("\ndevice apply, fresh interpreter, files on disk (goals: <= 2 s per 100 MB, "
              "peak extra <= 8 MiB + one 1 MiB frame)")
        table(applies, ["model", "case", "target MB", "seconds", "peak extra MiB"])
        if pair is not None and not args.skip_mqtt:
            delta_sent, full_sent = mqtt_bytes(pair[0], pair[1], tmp / "mqtt")
            print(f"\nMQTT, cnn v1 -> v2 (b): responder sent {delta_sent} bytes with the base "
                  f"held, {full_sent} without: {delta_sent / full_sent:.3f}x")


if __name__ == "__main__":
    main()
