"""The artifact directory: building, reading, and refusing anything that does not match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from edge_sdk import Artifact, ArtifactError, UsageError


@pytest.fixture()
def artifact(add_onnx: Path, tmp_path: Path) -> Artifact:
    return edge_sdk.build_artifact(
        add_onnx, tmp_path / "art", name="adder", version="1.2.0",
        sample={"x": np.ones((1, 4), np.float32)},
    )


def _edit_manifest(art: Artifact, **changes: object) -> None:
    path = art.path / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_built_artifact_has_complete_manifest(artifact: Artifact, add_onnx: Path) -> None:
    data = json.loads((artifact.path / "manifest.json").read_text())
    assert data["schema"] == 1
    assert data["name"] == "adder" and data["version"] == "1.2.0"
    assert data["format"] == "onnx" and data["model"] == "model.onnx"
    assert data["size_bytes"] == add_onnx.stat().st_size
    assert data["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
    assert data["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}]
    assert data["quantization"] == "none"
    assert data["source"]["format"] == "onnx" and len(data["source"]["sha256"]) == 64
    assert data["runtime"]["opset"] == 17 and data["runtime"]["min_version"]
    assert data["sample"] == "sample.npz"
    assert (artifact.path / "report.json").is_file()


def test_artifact_loads_and_predicts_with_manifest_metadata(artifact: Artifact) -> None:
    model = edge_sdk.load(artifact.path)
    assert model.name == "adder" and model.version == "1.2.0"
    sample = dict(np.load(artifact.path / "sample.npz"))
    np.testing.assert_array_equal(model.predict(sample)["y"], [[1, 2, 3, 4]])


def test_tampered_model_file_is_refused(artifact: Artifact) -> None:
    data = bytearray(artifact.model_path.read_bytes())
    data[-1] ^= 0xFF
    artifact.model_path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        edge_sdk.load(artifact.path)


def test_wrong_hash_in_manifest_is_refused(artifact: Artifact) -> None:
    _edit_manifest(artifact, sha256="0" * 64)
    with pytest.raises(ArtifactError, match=r"sha256 .* does not match the manifest"):
        Artifact.from_dir(artifact.path)


def test_missing_model_file_is_refused(artifact: Artifact) -> None:
    artifact.model_path.unlink()
    with pytest.raises(ArtifactError, match=r"'model\.onnx' named in the manifest is missing"):
        edge_sdk.load(artifact.path)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"schema": 2}, "unsupported manifest schema 2"),
        ({"format": "pickle"}, "format 'pickle' is not one of"),
        ({"model": "../../etc/passwd"}, "must be a plain file name"),
        ({"size_bytes": "big"}, "'size_bytes' has the wrong type"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": "1x4"}]}, "'shape' must be a list"),
        ({"sha256": "abc"}, "64 lowercase hex digits"),
    ],
)
def test_malformed_manifest_is_refused_with_the_field_named(
    artifact: Artifact, changes: dict[str, object], needle: str
) -> None:
    _edit_manifest(artifact, **changes)
    with pytest.raises(ArtifactError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Artifact.from_dir(artifact.path)


def test_missing_field_is_named(artifact: Artifact) -> None:
    path = artifact.path / "manifest.json"
    data = json.loads(path.read_text())
    del data["version"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="missing field 'version'"):
        Artifact.from_dir(artifact.path)


def test_invalid_json_manifest_is_refused(artifact: Artifact) -> None:
    (artifact.path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid JSON"):
        Artifact.from_dir(artifact.path)


def test_directory_without_manifest_is_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        edge_sdk.load(tmp_path)


def test_existing_output_directory_is_kept_unless_overwrite(
    artifact: Artifact, add_onnx: Path
) -> None:
    before = (artifact.path / "manifest.json").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        edge_sdk.build_artifact(add_onnx, artifact.path, name="adder", version="2")
    assert (artifact.path / "manifest.json").read_bytes() == before
    again = edge_sdk.build_artifact(add_onnx, artifact.path, name="adder", version="2",
                                    overwrite=True)
    assert again.manifest.version == "2"


def test_model_that_does_not_load_never_becomes_an_artifact(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(edge_sdk.ModelLoadError):
        edge_sdk.build_artifact(bad, tmp_path / "out", name="bad", version="1")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


def test_tflite_artifact_round_trips(tflite_int8: Path, tmp_path: Path) -> None:
    art = edge_sdk.build_artifact(tflite_int8, tmp_path / "t", name="dense", version="1",
                                  quantization="int8")
    assert art.manifest.format == "tflite" and art.manifest.model == "model.tflite"
    model = edge_sdk.load(art.path)
    assert model.predict(np.zeros((2, 4), np.float32))["scores"].shape == (2, 3)
