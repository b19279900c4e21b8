"""Delta files: built on the host, applied streaming on the device, refused when wrong.

Real model files (ONNX built here), real zstd; every refusal is a DeltaError with one
line, and nothing but the signed target is ever produced.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.delta import (
    Delta,
    DeltaError,
    DeltaLimits,
    apply_delta,
    build_delta,
    read_header,
)
from edge_sdk.delta._format import FRAME_MAX_OUTPUT, PREAMBLE_BYTES
from edge_sdk.errors import VerificationError
from tests._models import weighted_offset_model

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 65536)).astype(np.float32)  # 1 MiB of weights
HEAD = RNG.standard_normal(4096).astype(np.float32)


def model(tmp: Path, name: str, offset: float = 1.0, w: np.ndarray = W,
          head: np.ndarray = HEAD) -> bytes:
    return weighted_offset_model(tmp / f"{name}.onnx", offset, w, head).read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def apply(delta: bytes, base: bytes, target: bytes, limits: DeltaLimits | None = None,
          ) -> bytes:
    out = io.BytesIO()
    apply_delta(io.BytesIO(delta), io.BytesIO(base), out, base_sha256=sha(base),
                target_sha256=sha(target), target_length=len(target), limits=limits)
    return out.getvalue()


def rebuilt(delta: Delta, base: bytes, target: bytes) -> None:
    assert apply(delta.data, base, target) == target


def test_head_only_retrain_sends_little_more_than_the_head(tmp_path: Path) -> None:
    base = model(tmp_path, "v1")
    target = model(tmp_path, "v2", head=HEAD + 0.01)
    delta = build_delta(base, target, fmt="onnx")
    assert delta is not None and delta.method == "tensor"
    rebuilt(delta, base, target)
    assert delta.copied >= W.nbytes  # the big weight is copied, not sent
    assert delta.ratio < 0.02


def test_fine_tuned_float_weights_travel_as_differences_and_shrink(tmp_path: Path) -> None:
    base = model(tmp_path, "v1")
    moved = W * (1 + RNG.standard_normal(W.shape).astype(np.float32) * 1e-3)
    target = model(tmp_path, "v2", w=moved)
    delta = build_delta(base, target, fmt="onnx")
    assert delta is not None and delta.method == "tensor"
    rebuilt(delta, base, target)
    assert delta.diffed >= W.nbytes
    assert delta.ratio < 0.75


def test_unmapped_file_gets_a_generic_delta_that_rebuilds_it(tmp_path: Path) -> None:
    base = RNG.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    target = b"new header" + base[:150_000] + b"inserted" + base[150_000:]
    delta = build_delta(base, target, fmt=None)
    assert delta is not None and delta.method == "generic"
    rebuilt(delta, base, target)
    assert delta.ratio < 0.02


def test_generic_delta_is_not_built_against_a_base_too_big_for_devices() -> None:
    from edge_sdk.delta import DeltaConfig

    base = bytes(5000)
    assert build_delta(base, base + b"x", fmt=None,
                       config=DeltaConfig(max_prefix_base_bytes=4096)) is None
    delta = build_delta(base, base + b"x", fmt=None)
    assert delta is not None
    with pytest.raises(DeltaError, match="max_prefix_base_bytes"):
        apply(delta.data, base, base + b"x", DeltaLimits(max_prefix_base_bytes=4096))


def test_frames_hold_at_most_one_mib_of_output(tmp_path: Path) -> None:
    base = model(tmp_path, "v1")
    target = model(tmp_path, "v2", w=RNG.standard_normal(W.shape).astype(np.float32) * 3)
    delta = build_delta(base, target, fmt="onnx")
    assert delta is not None
    header = read_header(io.BytesIO(delta.data))
    assert len(header.frames) >= 2
    assert all(f.output <= FRAME_MAX_OUTPUT for f in header.frames)


# -- refusals --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, bytes]:
    tmp = tmp_path_factory.mktemp("delta")
    base = model(tmp, "v1")
    target = model(tmp, "v2", offset=2.0, head=HEAD * 1.5)
    delta = build_delta(base, target, fmt="onnx")
    assert delta is not None
    return base, target, delta.data


def refused(delta: bytes, base: bytes, target: bytes, match: str) -> None:
    with pytest.raises(DeltaError, match=match) as err:
        apply(delta, base, target)
    assert "\n" not in str(err.value) and isinstance(err.value, VerificationError)


def test_delta_made_against_another_base_is_refused(pair, tmp_path: Path) -> None:
    _, target, delta = pair
    other = model(tmp_path, "other", offset=7.0)
    refused(delta, other, target, "made against base")


def test_delta_for_another_target_is_refused(pair, tmp_path: Path) -> None:
    base, _, delta = pair
    refused(delta, base, model(tmp_path, "v3", offset=3.0), "the signed target is")


def test_flipped_byte_in_a_frame_is_refused_before_it_is_decompressed(pair) -> None:
    base, target, delta = pair
    bad = bytearray(delta)
    bad[-5] ^= 0xFF
    refused(bytes(bad), base, target, "does not match its sha256")


def _rewrite(delta: bytes, edit: object) -> bytes:
    """The delta with its header JSON changed by ``edit(doc)`` (frames kept)."""
    hlen = struct.unpack_from("<I", delta, 12)[0]
    doc = json.loads(delta[PREAMBLE_BYTES:PREAMBLE_BYTES + hlen])
    edit(doc)  # type: ignore[operator]
    body = json.dumps(doc).encode()
    return delta[:12] + struct.pack("<I", len(body)) + body + delta[PREAMBLE_BYTES + hlen:]


def test_ops_that_read_past_the_base_are_refused(pair) -> None:
    base, target, delta = pair

    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        op = next(o for o in doc["ops"] if o[0] == "copy")
        op[1] = len(base)
    refused(_rewrite(delta, edit), base, target, "past the base")


def test_ops_that_rebuild_other_bytes_than_signed_are_refused(pair) -> None:
    base, target, delta = pair

    def edit(doc: dict) -> None:  # type: ignore[type-arg]
        op = next(o for o in doc["ops"] if o[0] == "copy")
        op[1] = max(0, op[1] - 4)  # copies the wrong base bytes: a lying header
    refused(_rewrite(delta, edit), base, target, "not the signed target")


def test_frame_that_holds_more_than_its_header_says_is_refused(pair) -> None:
    import zstandard

    base, target, _ = pair
    big = zstandard.ZstdCompressor().compress(bytes(4 << 20))  # 4 MiB of zeros, 140 bytes
    doc = {"base": {"sha256": sha(base), "length": len(base)},
           "target": {"sha256": sha(target), "length": len(target)}, "prefix": False,
           "ops": [["literal", 0, len(target), 1]],
           "frames": [[len(big), len(target), sha(big)]]}
    body = json.dumps(doc).encode()
    delta = b"EDGEDLTA" + struct.pack("<II", 1, len(body)) + body + big
    if len(target) > FRAME_MAX_OUTPUT:
        refused(delta, base, target, "frame")
    else:
        refused(delta, base, target, "says it holds")


def test_header_over_the_limit_is_refused_before_it_is_read() -> None:
    delta = b"EDGEDLTA" + struct.pack("<II", 1, 64 << 20)
    with pytest.raises(DeltaError, match="over the limit"):
        read_header(io.BytesIO(delta))


@pytest.mark.parametrize("cut", [4, PREAMBLE_BYTES + 10, -7])
def test_truncated_delta_is_refused(pair, cut: int) -> None:
    base, target, delta = pair
    refused(delta[:cut], base, target, "truncated|shorter|delta")


def test_bytes_after_the_last_frame_are_refused(pair) -> None:
    base, target, delta = pair
    refused(delta + b"x", base, target, "after its last frame")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutated_delta_rebuilds_the_target_or_is_refused(pair, data: st.DataObject) -> None:
    base, target, delta = pair
    bad = bytearray(delta)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(bad) - 1))
        bad[i] = data.draw(st.integers(0, 255))
    try:
        out = apply(bytes(bad), base, target)
    except DeltaError as err:
        assert "\n" not in str(err)
    else:
        assert out == target  # a mutation that changed nothing that matters


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_differences_of_any_width_rebuild_the_new_bytes(itemsize: int,
                                                        data: st.DataObject) -> None:
    from edge_sdk.delta._apply import add_zigzag, shuffle, sub_zigzag, unshuffle

    n = data.draw(st.integers(0, 64)) * itemsize
    old = data.draw(st.binary(min_size=n, max_size=n))
    new = data.draw(st.binary(min_size=n, max_size=n))
    diff = sub_zigzag(old, new, itemsize)
    assert add_zigzag(old, unshuffle(shuffle(diff, itemsize), itemsize), itemsize) == new
    assert not any(sub_zigzag(old, old, itemsize))  # unchanged elements cost zeros
