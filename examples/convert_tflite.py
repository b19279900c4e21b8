"""Package an existing .tflite model as an edge-sdk artifact.

    python examples/convert_tflite.py [WORK_DIR]

Builds a small full-integer int8 TFLite model with TensorFlow (stand-in for the
.tflite you already have), then packages it: LiteRT must load and run it, its
signature goes into the manifest, the file itself is kept byte for byte
(re-quantizing a TFLite file is out of scope). The Predictor applies the int8
scale/zero-point, so you pass and get float32. CLI equivalent:

    edge-sdk convert model.tflite -o model-artifact --eval inputs.npz
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

import edge_sdk
from converters import convert


def build_int8_tflite(path: Path, w1: np.ndarray, w2: np.ndarray) -> None:
    class Mlp(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
        def serve(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"scores": tf.matmul(tf.nn.relu(tf.matmul(features, w1)), w2)}

    module = Mlp()
    saved = path.with_suffix(".savedmodel")
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    rng = np.random.default_rng(1)

    def representative():  # type: ignore[no-untyped-def]
        for _ in range(64):
            yield [rng.normal(size=(1, 4)).astype(np.float32)]

    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    path.write_bytes(conv.convert())


def main(work: Path) -> None:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 16)).astype(np.float32)
    w2 = rng.normal(size=(16, 3)).astype(np.float32)
    src = work / "mlp_int8.tflite"
    build_int8_tflite(src, w1, w2)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    inputs = work / "inputs.npz"
    np.savez(inputs, features=x)

    result = convert(src, work / "mlp-artifact", eval=inputs, overwrite=True)
    predictor = edge_sdk.load(result.artifact.path)
    print(f"quantization: {result.artifact.manifest.quantization}; inputs: "
          f"{[s.describe() for s in predictor.inputs]}")
    got = predictor.predict({"features": x[:1]})["scores"]
    want = np.maximum(x[:1] @ w1, 0) @ w2
    print(f"float in, float out: {got.dtype}; max |int8 - float| = "
          f"{np.max(np.abs(got - want)):.3f} (output range ±{np.max(np.abs(want)):.1f})")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
