"""Convert a Keras model to TFLite (and ONNX) with edge-sdk.

    python examples/convert_keras.py [WORK_DIR]

Trains a tiny Keras CNN, saves it as ``.keras`` and converts it twice:
``--to tflite`` (TensorFlow's converter: float32, float16, dynamic-range and
full-integer int8 measured in LiteRT, the fastest within the accuracy budget
wins) and ``--to onnx`` (tf2onnx). CLI equivalent:

    edge-sdk convert cnn.keras -o cnn-tflite --to tflite --calibration calib.npz
    edge-sdk convert cnn.keras -o cnn-onnx --calibration calib.npz
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import edge_sdk
from converters import convert


def main(work: Path) -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 192)
    x = rng.uniform(0, 0.5, (192, 16, 16, 3)).astype(np.float32)
    x[np.arange(192), :, :, y] += 0.5  # the class is the brightest colour channel

    inp = keras.Input((16, 16, 3), name="image")
    h = keras.layers.Conv2D(8, 3, activation="relu", padding="same")(inp)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(16, 3, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(h)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy")
    model.fit(x[:128], y[:128], epochs=6, batch_size=32, verbose=0)

    src = work / "cnn.keras"
    model.save(str(src))
    calib = work / "calib.npz"
    np.savez(calib, image=x[128:], labels=y[128:])
    want = model.predict(x[:8], verbose=0)

    for to in ("tflite", "onnx"):
        result = convert(src, work / f"cnn-{to}", to=to, calibration=calib, overwrite=True)
        got = edge_sdk.load(result.artifact.path).predict({"image": x[:1]})["probs"]
        print(f"--to {to}: chosen {result.chosen} ({result.artifact.manifest.quantization}), "
              f"{result.artifact.manifest.size_bytes} bytes; max |artifact - keras| = "
              f"{np.max(np.abs(got - want[:1])):.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
