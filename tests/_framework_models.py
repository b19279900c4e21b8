"""Tiny framework models the front-end tests train or build: torch, Keras, scikit-learn.

Frameworks are imported inside each builder so that importing this module is cheap.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

IMAGE = (3, 16, 16)  # torch CNN input (channels first)
FEATURES = 8


def blobs(n: int = 96, *, features: int = FEATURES, classes: int = 3,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable float32 clusters: (x [n, features], y [n])."""
    centers = np.random.default_rng(100).normal(0, 3, (classes, features))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.normal(0, 1, (n, features))
    return x.astype(np.float32), y.astype(np.int64)


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# -- torch -------------------------------------------------------------------------------


def torch_mlp() -> Any:
    """An MLP (8 → 16 → 3) trained for a few steps on :func:`blobs`."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = blobs()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    return model.eval()


class _Cnn:  # a namespace so the nn.Module subclass is built only when torch is imported
    @staticmethod
    def build() -> Any:
        import torch

        class Cnn(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
                self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)
                self.fc = torch.nn.Linear(16, 4)

            def forward(self, image: Any) -> Any:
                h = torch.relu(self.conv1(image))
                h = torch.relu(self.conv2(h))
                return self.fc(h.mean(dim=(2, 3)))

        torch.manual_seed(0)
        return Cnn().eval()


def torch_cnn() -> Any:
    """A two-conv CNN on [batch, 3, 16, 16] → 4 logits (random weights, seeded).

    Also the factory the tests name as ``tests._framework_models:torch_cnn``.
    """
    return _Cnn.build()


def torch_images(n: int = 24, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *IMAGE)).astype(np.float32)


def save_torchscript(model: Any, path: Path, example: np.ndarray) -> Path:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is still what users have
        traced = torch.jit.trace(model, torch.from_numpy(example))
        torch.jit.save(traced, str(path))
    return path


def save_exported_program(model: Any, path: Path, example: np.ndarray) -> Path:
    """torch.export.save with a dynamic batch dim."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (torch.from_numpy(example),),
                             dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    return path


# -- Keras -------------------------------------------------------------------------------


KERAS_IMAGE = (12, 12, 3)


def keras_cnn(path: Path) -> Any:
    """A small Keras CNN (Conv-Pool-Conv-GAP-Dense softmax) trained to confident
    predictions in 6 short epochs; saved at ``path`` (.keras or .h5). Returns the model."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input(KERAS_IMAGE, name="image")
    h = keras.layers.Conv2D(8, 3, activation="relu", padding="same")(inp)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(16, 3, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(h)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy")
    x, y = keras_images(128)
    model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    model.save(str(path))
    return model


def keras_images(n: int = 32, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is which colour channel is brightest."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.uniform(0, 0.5, (n, *KERAS_IMAGE))
    x[np.arange(n), :, :, y] += 0.5
    return x.astype(np.float32), y.astype(np.int64)


def keras_saved_model(model: Any, path: Path) -> Path:
    """The model exported as a SavedModel directory (model.export)."""
    model.export(str(path), verbose=False)
    return path


# -- scikit-learn ------------------------------------------------------------------------


def sklearn_models() -> dict[str, Any]:
    """Fitted LogisticRegression, RandomForest and a StandardScaler+LogisticRegression
    Pipeline on :func:`blobs`."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = blobs()
    x = x * np.linspace(1, 20, FEATURES, dtype=np.float32)  # give the scaler work to do
    return {
        "logreg": LogisticRegression(max_iter=500).fit(x, y),
        "forest": RandomForestClassifier(n_estimators=12, max_depth=5, random_state=0).fit(x, y),
        "pipeline": make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y),
    }


def sklearn_inputs(n: int = 40, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    x, y = blobs(n, seed=seed)
    return x * np.linspace(1, 20, FEATURES, dtype=np.float32), y


TABULAR_FEATURES = 6
CATEGORY_COLUMNS = [4, 5]  # integer-coded categories carried in the float input


def tabular(n: int = 400, seed: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mixed tabular rows: (x [n, 6] float32 whose columns 4 and 5 hold category codes
    0-3 and 0-2, three-class labels, a smooth regression target of scale ~5)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = np.random.default_rng(101).normal(0, 1.2, (3, 4))
    numeric = centers[y] + rng.normal(0, 1, (n, 4))
    cats = np.stack([(y + rng.integers(0, 2, n)) % 4, rng.integers(0, 3, n)], axis=1)
    x = np.concatenate([numeric * [1, 5, 0.2, 10], cats], axis=1).astype(np.float32)
    target = (numeric @ [1.0, -0.5, 2.0, 0.3] + np.sin(numeric[:, 0]) + cats[:, 0]
              - 0.5 * cats[:, 1])
    return x, y.astype(np.int64), target.astype(np.float32)


SKLEARN_KINDS = (
    "logreg", "forest", "forest-reg", "gboost", "gboost-reg", "hgb", "hgb-reg",
    "hgb-pipeline", "hgb-reg-pipeline", "svc", "knn", "mlp", "column-transformer",
)


def sklearn_fitted(kind: str, x: np.ndarray, y: np.ndarray) -> Any:
    """One of :data:`SKLEARN_KINDS` fitted on ``(x, y)``, quietly: SVC(probability=True)
    is deprecated in scikit-learn 1.9 but is what users' pickles hold, and the MLP's few
    iterations are deliberate."""
    import warnings

    est = sklearn_estimator(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(x, y)


def sklearn_estimator(kind: str) -> Any:
    """An unfitted, deliberately small estimator of each kind users convert most, for
    :func:`tabular` data (``*-reg`` kinds are regressors)."""
    from sklearn import ensemble, linear_model, neighbors, neural_network, svm
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = [c for c in range(TABULAR_FEATURES) if c not in CATEGORY_COLUMNS]
    trees = {"n_estimators": 10, "max_depth": 4, "random_state": 0}
    hgb = {"max_iter": 15, "max_leaf_nodes": 8, "random_state": 0}
    builders: dict[str, Any] = {
        "logreg": lambda: make_pipeline(StandardScaler(), linear_model.LogisticRegression()),
        "forest": lambda: ensemble.RandomForestClassifier(**trees),
        "forest-reg": lambda: ensemble.RandomForestRegressor(**trees),
        "gboost": lambda: ensemble.GradientBoostingClassifier(**trees),
        "gboost-reg": lambda: ensemble.GradientBoostingRegressor(**trees),
        "hgb": lambda: ensemble.HistGradientBoostingClassifier(**hgb),
        "hgb-reg": lambda: ensemble.HistGradientBoostingRegressor(**hgb),
        "hgb-pipeline": lambda: make_pipeline(
            StandardScaler(), ensemble.HistGradientBoostingClassifier(**hgb)),
        "hgb-reg-pipeline": lambda: make_pipeline(
            StandardScaler(), ensemble.HistGradientBoostingRegressor(**hgb)),
        "svc": lambda: make_pipeline(StandardScaler(), svm.SVC(probability=True,
                                                               random_state=0)),
        "knn": lambda: make_pipeline(StandardScaler(), neighbors.KNeighborsClassifier(5)),
        "mlp": lambda: make_pipeline(StandardScaler(), neural_network.MLPClassifier(
            (16,), max_iter=300, random_state=0)),
        "column-transformer": lambda: make_pipeline(
            ColumnTransformer([
                ("num", StandardScaler(), numeric),
                ("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORY_COLUMNS),
            ]),
            linear_model.LogisticRegression()),
    }
    return builders[kind]()


def save_pickle(obj: Any, path: Path) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


# -- TFLite sources ----------------------------------------------------------------------


def tflite_fp16_weights(path: Path) -> tuple[Path, np.ndarray]:
    """A [batch, 4] → [batch, 8] matmul with float16 weights (TFLite dequantizes them at
    load). Returns the file and the float32 weight matrix."""
    import tensorflow as tf

    w = np.random.default_rng(4).normal(size=(4, 8)).astype(np.float32)

    class Dense(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(w)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
        def serve(self, features: Any) -> dict[str, Any]:
            return {"scores": tf.matmul(features, self.w)}

    module = Dense()
    saved = path.with_suffix(".savedmodel")
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    path.write_bytes(conv.convert())
    return path, w


def tflite_resource_variable(path: Path) -> Path:
    """A stateful model: a resource variable accumulates the inputs ([1, 4] → running sum)."""
    import tensorflow as tf

    class Accumulator(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.total = tf.Variable(tf.zeros([1, 4]), name="total")

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            self.total.assign_add(x)
            return {"running_sum": tf.identity(self.total)}

    module = Accumulator()
    saved = path.with_suffix(".savedmodel")
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    conv.experimental_enable_resource_variables = True
    path.write_bytes(conv.convert())
    return path


def torch_branchy() -> Any:
    """A module with data-dependent control flow: tracing bakes in one branch, so an ONNX
    export silently differs from torch on inputs that take the other branch."""
    import torch

    class Branchy(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            if float(x.sum()) > 0:
                return x * 2.0
            return x - 10.0

    return Branchy().eval()


def torch_two_inputs() -> Any:
    """forward(features, scale) → features @ W * scale: two inputs bound by name."""
    import torch

    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(FEATURES, 2)

        def forward(self, features: Any, scale: Any) -> Any:
            return {"scaled": self.proj(features) * scale, "raw": self.proj(features)}

    return TwoInputs().eval()


# -- whole fixtures, built in a child interpreter (tests/_child.py) ----------------------


def _torch_run(model: Any, *arrays: np.ndarray) -> Any:
    import torch

    with torch.inference_mode():
        out = model(*[torch.from_numpy(a) for a in arrays])
    if isinstance(out, dict):
        return {k: v.numpy() for k, v in out.items()}
    return out.numpy()


def torch_fixture(d: Path) -> dict[str, Any]:
    """The torch front-end tests' sources: TorchScript, exported programs, calibration
    files, and torch's own outputs to compare artifacts with."""
    cnn = torch_cnn()
    images = torch_images()
    mlp = torch_mlp()
    x, y = blobs(40, seed=5)
    return {
        "dir": d, "images": images, "x": x,
        "cnn_ts": save_torchscript(cnn, d / "cnn.pt", images[:2]),
        "cnn_pt2": save_exported_program(cnn, d / "cnn.pt2", images[:2]),
        "mlp_ts": save_torchscript(mlp, d / "mlp.torchscript", x[:2]),
        "images_npz": save_npz(d / "images.npz", image=images),
        "mlp_npz": save_npz(d / "mlp.npz", input=x, labels=y),
        "cnn_out": {b: _torch_run(cnn, images[:b]) for b in (1, 5)},
        "mlp_out": _torch_run(mlp, x),
    }


def torch_pickles(d: Path) -> dict[str, Path]:
    """``torch.save`` of the whole trained MLP and of its state_dict only."""
    import torch

    mlp = torch_mlp()
    torch.save(mlp, d / "whole.pth")
    torch.save(mlp.state_dict(), d / "weights.pth")
    return {"whole": d / "whole.pth", "weights": d / "weights.pth"}


def torch_two_inputs_outputs(features: np.ndarray, scale: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = _torch_run(torch_two_inputs(), features, scale)
    return out


def torch_fixed_batch_program(path: Path, images: np.ndarray) -> np.ndarray:
    """The CNN exported with a fixed batch of ``len(images)``; returns torch's outputs."""
    import torch

    cnn = torch_cnn()
    torch.export.save(torch.export.export(cnn, (torch.from_numpy(images),)), str(path))
    out: np.ndarray = _torch_run(cnn, images)
    return out


def torch_segfault() -> Any:
    """A torch factory that crashes its interpreter, as a broken native extension would."""
    import os
    import signal

    import torch  # noqa: F401 - the crash happens with the framework loaded

    print("building the model, then crashing", flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)
    return None  # pragma: no cover - the process is gone


def keras_fixture(d: Path) -> dict[str, Any]:
    """The Keras front-end tests' sources (.keras, .h5, SavedModel, weights only) and
    Keras's own predictions on the evaluation images."""
    model = keras_cnn(d / "cnn.keras")
    model.save(str(d / "cnn.h5"))
    model.save_weights(str(d / "only.weights.h5"))
    x, y = keras_images(40, seed=7)
    return {
        "x": x, "y": y, "keras": d / "cnn.keras", "h5": d / "cnn.h5",
        "weights": d / "only.weights.h5",
        "saved": keras_saved_model(model, d / "cnn_saved"),
        "calib": save_npz(d / "calib.npz", image=x, labels=y),
        "expected": model.predict(x, verbose=0),
    }


def keras_lambda_model(path: Path) -> Path:
    """x → 2x + 1 through a Lambda layer (Python code in the file)."""
    import keras

    inp = keras.Input((4,), name="x")
    out = keras.layers.Lambda(lambda t: t * 2.0 + 1.0, name="affine")(inp)
    keras.Model(inp, out).save(str(path))
    return path


def keras_two_inputs(path: Path, zeta: np.ndarray, alpha: np.ndarray) -> list[np.ndarray]:
    """Inputs declared in the reverse of alphabetical order (the signature sorts them);
    saved at ``path``; returns Keras's outputs [out, aux] on (zeta, alpha)."""
    import keras

    keras.utils.set_random_seed(0)
    z = keras.Input((3,), name="zeta")
    a = keras.Input((2,), name="alpha")
    h = keras.layers.Concatenate()([z * 10.0, a])
    model = keras.Model([z, a], [keras.layers.Dense(2, name="out")(h),
                                 keras.layers.Dense(1, name="aux")(h)])
    model.save(str(path))
    return list(model.predict([zeta, alpha], verbose=0))


def tflite_two_signatures(path: Path) -> Path:
    """One .tflite with two signatures: ``a`` ([1, 4] → x·2) and ``b`` ([1, 8] → x+1)."""
    import tensorflow as tf

    class Two(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
        def a(self, x: Any) -> dict[str, Any]:
            return {"y": x * 2.0}

        @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
        def b(self, x: Any) -> dict[str, Any]:
            return {"z": x + 1.0}

    module = Two()
    conv = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.a.get_concrete_function(), module.b.get_concrete_function()], module)
    path.write_bytes(conv.convert())
    return path


def tflite_dynamic_image(path: Path) -> Path:
    """A .tflite with a [-1, -1, -1, 3] input (Keras None dims): conv, global pool → [N, 4]."""
    import tensorflow as tf

    inp = tf.keras.Input(shape=(None, None, 3), name="image")
    x = tf.keras.layers.Conv2D(4, 3, padding="same")(inp)
    model = tf.keras.Model(inp, tf.keras.layers.GlobalAveragePooling2D()(x))
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path
