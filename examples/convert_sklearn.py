"""Convert a scikit-learn Pipeline into an ONNX artifact.

    python examples/convert_sklearn.py [WORK_DIR]

Fits StandardScaler + LogisticRegression on the iris data, pickles it with
joblib and converts it. Loading a pickle runs code from the file, so the
conversion must be told the file is trusted. CLI equivalent:

    edge-sdk convert iris.joblib -o iris-artifact --trust-pickle --calibration calib.npz

The artifact has two plain outputs: ``label`` (int64) and ``probabilities``
(float32 [batch, classes]); the class names are in the manifest's ``labels``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import edge_sdk
from converters import convert


def main(work: Path) -> None:
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    src = work / "iris.joblib"
    joblib.dump(clf, src)
    calib = work / "calib.npz"
    np.savez(calib, input=x, labels=y)

    result = convert(src, work / "iris-artifact", trust_pickle=True, calibration=calib,
                     overwrite=True)
    predictor = edge_sdk.load(result.artifact.path)
    out = predictor.predict({"input": x})
    agree = float(np.mean(out["label"] == clf.predict(x)))
    err = float(np.max(np.abs(out["probabilities"] - clf.predict_proba(x))))
    print(f"chosen: {result.chosen}; labels equal to scikit-learn on {agree:.0%} of "
          f"{len(x)} samples; max probability error {err:.1e}")
    print(f"classes: {result.artifact.manifest.extra['labels']}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
