"""Attacks on delta updates, against the repository simulator (the real trust client, the
real chunk window, the real signed repository).

A delta is a TUF target like any other, and whatever it rebuilds must equal the signed
full target before anything uses it. Every attack below ends the same way: the
delta is given up, the full model is fetched in the same call, and the artifact
written is exactly the signed one. The signed-but-wrong deltas need the targets key
(a compromised or buggy release host); the tampered and oversized ones need nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import edge_sdk
from edge_sdk.delta import build_delta
from tests._delta_env import DeltaEnv, sign_delta_that_rebuilds_other_bytes, two_versions


@pytest.fixture
def d(tmp_path: Path) -> DeltaEnv:
    return two_versions(tmp_path)


def full_fallback(d: DeltaEnv, tmp_path: Path, why: str) -> None:
    client, dest = d.fetch(tmp_path)
    got = edge_sdk.Artifact.from_dir(dest)  # hashes the model again
    assert got.manifest.sha256 == d.arts["2"].manifest.sha256
    dl = client.last_download
    assert dl is not None and dl.kind == "full" and dl.base_version == "1"
    assert dl.fallback is not None and why in dl.fallback and "\n" not in dl.fallback
    assert dl.bytes == d.arts["2"].manifest.size_bytes
    assert list(client.partial_dir.iterdir()) == []  # nothing of the delta is kept


def test_honest_delta_is_applied_instead_of_the_full_download(d: DeltaEnv,
                                                              tmp_path: Path) -> None:
    client, dest = d.fetch(tmp_path)
    assert edge_sdk.Artifact.from_dir(dest).manifest.sha256 == d.arts["2"].manifest.sha256
    dl = client.last_download
    assert dl is not None and dl.kind == "delta" and dl.fallback is None
    assert dl.bytes < d.arts["2"].manifest.size_bytes * 0.05
    assert not any(p.endswith(".onnx") and "/2/" in p for p in d.sim.fetched)


def test_tampered_delta_bytes_fall_back_to_the_full_model(d: DeltaEnv, tmp_path: Path) -> None:
    ref = d.repo.find("m", "2").deltas[0]
    path = d.remote(ref.path, d.repo.load("targets").signed.targets[ref.path].hashes["sha256"])
    bad = bytearray(d.sim.files[path])
    bad[-3] ^= 0x55  # inside the last zstd frame
    d.sim.files[path] = bytes(bad)
    full_fallback(d, tmp_path, "do not match the signed length and sha256")


def test_oversized_delta_is_cut_at_its_signed_length(d: DeltaEnv, tmp_path: Path) -> None:
    ref = d.repo.find("m", "2").deltas[0]
    path = d.remote(ref.path, d.repo.load("targets").signed.targets[ref.path].hashes["sha256"])
    d.sim.files[path] += bytes(1 << 20)
    full_fallback(d, tmp_path, "at most")


def test_signed_delta_made_against_another_model_falls_back(d: DeltaEnv,
                                                            tmp_path: Path) -> None:
    other = d.artifact("9", 9.0)  # never released, never held by the device
    delta = build_delta(other.model_path.read_bytes(), d.arts["2"].model_path.read_bytes(),
                        fmt="onnx")
    assert delta is not None
    d.sign_delta(d.delta_path("2"), delta.data)
    full_fallback(d, tmp_path, "made against base")


def test_signed_delta_that_rebuilds_another_model_falls_back(d: DeltaEnv,
                                                             tmp_path: Path) -> None:
    other = d.artifact("7", 7.0)
    delta = build_delta(d.arts["1"].model_path.read_bytes(), other.model_path.read_bytes(),
                        fmt="onnx")
    assert delta is not None
    d.sign_delta(d.delta_path("2"), delta.data)
    full_fallback(d, tmp_path, "the signed target is")


def test_signed_delta_whose_header_lies_about_its_result_falls_back(d: DeltaEnv,
                                                                    tmp_path: Path) -> None:
    sign_delta_that_rebuilds_other_bytes(d, "2")
    full_fallback(d, tmp_path, "not the signed target")


def test_signed_delta_with_a_header_over_the_device_limit_falls_back(d: DeltaEnv,
                                                                     tmp_path: Path) -> None:
    import struct

    d.sign_delta(d.delta_path("2"), b"EDGEDLTA" + struct.pack("<II", 1, 1 << 30) + bytes(64))
    full_fallback(d, tmp_path, "over the limit")
