"""Attacks on `samples pull` from a hostile device: the host writes nothing it did not
bound, never unpickles, never allocates what a header claims."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy

from edge_sdk.errors import VerificationError
from edge_sdk.samples._host import write_calibration


def _npy(shape: tuple[int, ...], data: bytes, dtype: str = "<f8") -> bytes:
    b = io.BytesIO()
    npy.write_array_header_1_0(b, {"descr": dtype, "fortran_order": False, "shape": shape})
    return b.getvalue() + data


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(2**40,), (10**6, 10**6), (2**31,)])
def test_a_header_claiming_a_huge_shape_is_refused_before_allocation(
        tmp_path: Path, shape: tuple[int, ...]) -> None:
    bundle = _zip({"x.npy": _npy(shape, b"\0" * 64)})
    with pytest.raises(VerificationError, match="claims shape"):
        write_calibration(bundle, tmp_path / "o.npz", what="bundle")
    assert not (tmp_path / "o.npz").exists()


def test_a_zip_bomb_bundle_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    n = 80 * 1024 * 1024 // 8  # 80 MiB of zeros: deflates to a few hundred KiB
    bundle = _zip({"x.npy": _npy((n,), bytes(n * 8))}, zipfile.ZIP_DEFLATED)
    assert len(bundle) < 1024 * 1024
    with pytest.raises(VerificationError, match="unpacks to more than"):
        write_calibration(bundle, tmp_path / "o.npz", what="bundle")
    assert not (tmp_path / "o.npz").exists()


def test_a_pickled_array_is_never_unpickled(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("unpickled!",))

    payload = pickle.dumps(np.array([Boom()], dtype=object))
    bundle = _zip({"x.npy": _npy((1,), payload, "|O")})
    with pytest.raises(VerificationError):
        write_calibration(bundle, tmp_path / "o.npz", what="bundle")
    assert not (tmp_path / "o.npz").exists()


def test_a_plain_bundle_still_writes(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.ones((3, 4), np.float32), scores=np.zeros(3))
    got = write_calibration(buf.getvalue(), tmp_path / "o.npz", what="bundle")
    assert got.count == 3 and got.inputs == ("x",)
