"""Per-call overhead of ``Predictor.predict`` over a raw ``InferenceSession.run``.

Both run the same model file in the same process, measured interleaved in
blocks so that machine noise hits both sides alike. Goal: ≤ 5 µs extra per
call on the trivial Add model.

    python bench/predict_overhead.py [--blocks 200] [--block-size 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edge_sdk
from tests import _models


def measure(model_path: Path, blocks: int, block_size: int) -> tuple[float, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    predictor = edge_sdk.load(model_path, threads=1)
    name = sess.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    feed = {name: x}
    raw_times: list[float] = []
    sdk_times: list[float] = []
    clock = time.perf_counter

    def raw_block() -> float:
        t0 = clock()
        for _ in range(block_size):
            sess.run(None, feed)
        return (clock() - t0) / block_size

    def sdk_block() -> float:
        t0 = clock()
        for _ in range(block_size):
            predictor.predict(feed)
        return (clock() - t0) / block_size

    for _ in range(5):  # warm-up
        raw_block()
        sdk_block()
    for i in range(blocks):
        # Alternate which side goes first so neither always gets the warmer cache.
        if i % 2:
            raw_times.append(raw_block())
            sdk_times.append(sdk_block())
        else:
            sdk_times.append(sdk_block())
            raw_times.append(raw_block())
    return float(np.median(raw_times)) * 1e6, float(np.median(sdk_times)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "trivial Add [1,4]": _models.add_model(Path(tmp) / "add.onnx"),
            "small CNN [1,3,32,32]": _models.small_cnn(Path(tmp) / "cnn.onnx"),
        }
        print(f"{'model':<24} {'raw run µs':>11} {'predict µs':>11} {'extra µs':>9} {'ratio':>6}")
        for label, path in models.items():
            raw, sdk = measure(path, args.blocks, args.block_size if "Add" in label else 20)
            print(f"{label:<24} {raw:>11.2f} {sdk:>11.2f} {sdk - raw:>9.2f} {sdk / raw:>6.3f}")
    print("goal: extra ≤ 5 µs per call on the trivial model")


if __name__ == "__main__":
    main()
