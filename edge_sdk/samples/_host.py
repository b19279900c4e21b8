"""Host side of field samples: publish a signed request, wait for the device's word, pull
the bundle and write it as a calibration set.

:func:`publish_request` publishes the signed request retained on the device's
``samples/req`` topic (an offline device gets it when it connects; a newer request
replaces it). :func:`wait_status` reads ``samples/res`` until the request is ready,
refused or expired. :func:`pull_bundle` fetches the bundle with the same
:class:`~edge_sdk.transport.ChunkClient` that devices fetch releases with, roles
reversed (chunk requests on ``samples/get`` for ``samples/ID``, answers on
``samples/put``), checks its size and sha256 against the status, and writes the inputs
in the calibration-set format of DESIGN.md (one array per input name, samples along
axis 0: what ``convert --eval`` and ``--calibration`` read); the outputs, scores and
rule the device added go to a second file beside it.
"""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._io import save_npz
from ..errors import EdgeError, TransportError, UsageError, VerificationError
from ..transport import ChunkClient, FetchConfig, MqttConnection, Topics
from ._request import MAX_BYTES, SampleRequest, SampleStatus, sign_sample_request

if TYPE_CHECKING:
    from securesystemslib.signer import Signer  # type: ignore[attr-defined]

#: The path root a device serves its bundles under (``samples/ID``).
BUNDLE_ROOT = "samples"
#: Bundle arrays that are not model inputs (they go to the ``.extra.npz`` file).
_EXTRA = ("rule", "scores")


class SamplesError(EdgeError):
    """The device refused the request, let it expire, or did not answer in time."""


@dataclass(frozen=True)
class Pulled:
    """What :func:`pull_bundle` wrote: the calibration file, the extras file (None when
    the bundle had nothing besides inputs), the number of samples and the inputs."""

    path: Path
    extra: Path | None
    count: int
    inputs: tuple[str, ...]


def publish_request(connection: MqttConnection, request: SampleRequest,
                    signers: Iterable[Signer], *, topics: Topics | None = None,
                    timeout: float = 10.0) -> bytes:
    """Sign ``request`` and publish it retained on its device's ``samples/req`` topic;
    return the signed payload."""
    t = topics or Topics.for_config(connection.config)
    payload = sign_sample_request(request, signers)
    connection.publish_wait(t.samples_request(request.device), payload, qos=1, retain=True,
                            timeout=timeout)
    return payload


def wait_status(connection: MqttConnection, device: str, rid: str, *, timeout: float,
                topics: Topics | None = None) -> SampleStatus:
    """The device's status of request ``rid`` once it is final (``ready``); raises
    :class:`SamplesError` when it is refused or expired, or still collecting (or
    unanswered) after ``timeout`` seconds."""
    t = topics or Topics.for_config(connection.config)
    last: list[SampleStatus] = []
    done = threading.Event()

    def on_status(topic: str, payload: bytes) -> None:
        try:
            st = SampleStatus.from_bytes(payload)
        except VerificationError:
            return
        if st.id == rid:
            last[:] = [st]
            if st.state != "collecting":
                done.set()

    sub = connection.subscribe(t.samples_status(device), on_status, qos=1)
    try:
        done.wait(timeout)
    finally:
        sub.cancel()
    if not last:
        raise SamplesError(f"device {device} said nothing of sample request {rid[:12]} in "
                           f"{timeout:g} s (offline, samples disabled, or an agent without "
                           "field samples)")
    st = last[0]
    if st.state == "collecting":
        raise SamplesError(f"sample request {rid[:12]} on {device} is still collecting: "
                           f"{st.count} sample(s) kept after {timeout:g} s"
                           f"{'; ' + st.reason if st.reason else ''} (pull again later, "
                           "or --wait longer)")
    if st.state != "ready":
        raise SamplesError(f"device {device} {st.state} sample request {rid[:12]}: "
                           f"{st.reason or 'no reason given'}")
    return st


def pull_bundle(connection: MqttConnection, device: str, status: SampleStatus, out: Path,
                *, topics: Topics | None = None, config: FetchConfig | None = None,
                ) -> Pulled:
    """Fetch the bundle ``status`` announces, check it, write the calibration set to
    ``out`` (atomically) and the extras to ``OUT.extra.npz``."""
    t = topics or Topics.for_config(connection.config)
    if status.size > MAX_BYTES:
        raise VerificationError(f"device {device} announces a bundle of {status.size} "
                                f"bytes, over the limit of {MAX_BYTES}")
    cfg = config or FetchConfig(max_artifact_bytes=MAX_BYTES, stall_timeout=30.0)
    client = ChunkClient(connection, device, topics=t, config=cfg,
                         request_topic=t.samples_get(device),
                         response_topic=t.samples_put(device), roots=(BUNDLE_ROOT,))
    buf = io.BytesIO()
    try:
        client.download(f"{BUNDLE_ROOT}/{status.id}", buf.write, length=status.size,
                        max_length=MAX_BYTES)
    except TransportError as err:
        raise SamplesError(f"pulling sample bundle {status.id[:12]} from {device}: "
                           f"{err}") from err
    finally:
        client.close()
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != status.size or digest != status.sha256:
        raise VerificationError(
            f"sample bundle {status.id[:12]} from {device} is {len(data)} bytes with sha256 "
            f"{digest[:16]}…, not the {status.size} bytes and {status.sha256[:16]}… "
            "announced; nothing written")
    return write_calibration(data, out, what=f"sample bundle {status.id[:12]} from {device}")


def write_calibration(bundle: bytes, out: Path, *, what: str) -> Pulled:
    """Split a bundle into the calibration set (inputs) and its extras; write both."""
    try:
        with np.load(io.BytesIO(bundle), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise VerificationError(f"{what} is not a readable .npz: {err}") from err
    inputs = {k: v for k, v in arrays.items() if "." not in k and k not in _EXTRA}
    extra = {k: v for k, v in arrays.items() if k not in inputs}
    if not inputs:
        raise VerificationError(f"{what} holds no input array")
    counts = {v.shape[0] if v.ndim else -1 for v in inputs.values()}
    if len(counts) != 1 or -1 in counts:
        raise VerificationError(f"{what}: its inputs disagree on the number of samples")
    if out.suffix.lower() != ".npz":
        raise UsageError(f"{out}: the calibration file must end in .npz")
    save_npz(out, inputs)
    extra_path = None
    if extra:
        extra_path = out.with_suffix(".extra.npz")
        save_npz(extra_path, extra)
    return Pulled(out, extra_path, counts.pop(), tuple(sorted(inputs)))


def new_request_id() -> str:
    import secrets

    return secrets.token_hex(16)

