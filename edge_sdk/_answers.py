"""Answers in a task's terms: an artifact converted with ``--preprocess image:...`` and
``--postprocess classify|detect|segment|embed`` takes a uint8 RGB image and its outputs
mean labels, boxes, a class map or an embedding. This module turns an image (an array or
a JPEG/PNG file) into the artifact's feed and its outputs into :class:`Answer` objects.

Decoding a file needs Pillow (``pip install 'edge-sdk[agent-images]'``); the image's
declared size is checked against a pixel limit before any pixel is decoded.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._artifact import Manifest
from ._oneline import one_line
from .errors import EdgeError, InputError

#: Default bound on an image's pixel count (width x height), checked before it is
#: decoded: a 4K UHD frame, a 24 MiB RGB array.
MAX_IMAGE_PIXELS = 3840 * 2160
#: What to install for image files.
IMAGES_EXTRA = "pip install 'edge-sdk[agent-images]'"
TASKS = ("classify", "detect", "segment", "embed")
_FORMATS = ("JPEG", "PNG")


class ImageTooLarge(InputError):
    """The image's declared size is over the pixel limit (nothing was decoded)."""

    def __init__(self, width: int, height: int, limit: int, what: str = "max_pixels") -> None:
        self.width, self.height, self.limit = width, height, limit
        super().__init__(f"image of {width}x{height} = {width * height} pixels is over "
                         f"{what} ({limit}); it was not decoded")


class NoImageDecoder(EdgeError):
    """Pillow, the image decoder, is not installed."""

    def __init__(self) -> None:
        super().__init__(f"decoding JPEG/PNG images needs Pillow ({IMAGES_EXTRA})")


@dataclass(frozen=True)
class Label:
    """A class: its name (from the artifact's labels, else the index as text), its
    index in the model's classes and its score."""

    name: str
    index: int
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "score": self.score}


@dataclass(frozen=True)
class Box:
    """A detection: corners in the input image's pixels, its class name, score and class
    index."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str
    score: float
    index: int

    def to_json(self) -> dict[str, Any]:
        return {"x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1,
                "label": self.label, "index": self.index, "score": self.score}


@dataclass(frozen=True, eq=False)
class Answer:
    """One image's answer. ``task`` says which field holds it: ``labels`` (classify, best
    first), ``boxes`` (detect, best first), ``class_map`` (segment: ``[H, W]`` class
    indices at the image's size) or ``embedding`` (embed: ``[D]`` float32)."""

    task: str
    labels: tuple[Label, ...] = ()
    boxes: tuple[Box, ...] = ()
    class_map: np.ndarray | None = None
    embedding: np.ndarray | None = None

    def to_json(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """The answer as JSON types (``names``: the labels, for a class map's classes)."""
        out: dict[str, Any] = {"task": self.task}
        if self.task == "classify":
            out["labels"] = [lb.to_json() for lb in self.labels]
        elif self.task == "detect":
            out["boxes"] = [b.to_json() for b in self.boxes]
        elif self.task == "segment" and self.class_map is not None:
            ids, counts = np.unique(self.class_map, return_counts=True)
            # A JSON list of ints would cost ~40 bytes of Python objects per pixel: the
            # map goes as little-endian bytes of the smallest unsigned type, base64.
            small = np.uint8 if ids.max(initial=0) < 256 else np.uint16
            data = np.ascontiguousarray(self.class_map, dtype=np.dtype(small).newbyteorder("<"))
            out["class_map"] = {"shape": list(self.class_map.shape),
                                "dtype": np.dtype(small).name,
                                "base64": base64.b64encode(data.tobytes()).decode()}
            out["classes"] = [{"name": _name(names, int(i)), "index": int(i),
                               "pixels": int(c)} for i, c in zip(ids, counts, strict=True)]
        elif self.embedding is not None:
            out["embedding"] = self.embedding.tolist()
            out["size"] = int(self.embedding.shape[-1])
        return out


def _name(names: Sequence[str] | None, index: int) -> str:
    return names[index] if names is not None and 0 <= index < len(names) else str(index)


# ------------------------------------------------------------------------- images

def decode_image(source: bytes | bytearray | str | os.PathLike[str], *,
                 max_pixels: int = MAX_IMAGE_PIXELS,
                 before: Callable[[int, int], None] | None = None) -> np.ndarray:
    """A JPEG or PNG (bytes or a file path) as a uint8 RGB array ``[H, W, 3]``.

    Raises :class:`ImageTooLarge` when its declared size is over ``max_pixels`` (read
    from the header, before decoding), :class:`~edge_sdk.errors.InputError` when it is
    not a JPEG/PNG Pillow decodes, :class:`NoImageDecoder` without Pillow. ``before``
    is called with (width, height) once they passed the limit, before decoding (to
    reserve memory; what it raises goes through).
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:
        raise NoImageDecoder() from err
    what = "image" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        fp: Any = (io.BytesIO(source) if isinstance(source, (bytes, bytearray))
                   else open(source, "rb"))  # noqa: SIM115
    except OSError as err:
        raise InputError(f"{what}: cannot read it ({one_line(err)})") from err
    with fp:
        try:
            # Image.open reads the header only; pixels are decoded by load().
            im = Image.open(fp, formats=_FORMATS)
        except Image.DecompressionBombError as err:
            raise InputError(f"{what}: over Pillow's pixel limit, not decoded "
                             f"({one_line(err)})") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise InputError(f"{what}: not a JPEG or PNG image ({one_line(err)})") from err
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageTooLarge(width, height, max_pixels)
            if before is not None:
                before(width, height)
            try:
                im.load()
                rgb = im if im.mode == "RGB" else im.convert("RGB")
                arr = np.asarray(rgb, dtype=np.uint8)
            except Image.DecompressionBombError as err:
                raise InputError(f"{what}: over Pillow's pixel limit, not decoded "
                                 f"({one_line(err)})") from err
            except (OSError, SyntaxError, ValueError) as err:
                raise InputError(f"{what}: cannot decode it ({one_line(err)})") from err
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"{what}: decoded to shape {list(arr.shape)}, not [H, W, 3]")
    return arr


# ------------------------------------------------------------------------- the task

@dataclass(frozen=True)
class ImageTask:
    """What an artifact's manifest says about answering images: the image input, the
    task and the labels. Build it with :meth:`from_manifest`."""

    input: str
    task: str
    labels: tuple[str, ...] | None

    @classmethod
    def from_manifest(cls, manifest: Manifest | None, what: str = "this model") -> ImageTask:
        """Raises :class:`~edge_sdk.errors.InputError` naming what the artifact lacks."""
        extra: Mapping[str, Any] = manifest.extra if manifest is not None else {}
        pre, post = extra.get("preprocess"), extra.get("postprocess")
        lacks = [flag for flag, sec in (("--preprocess image:...", pre),
                                        ("--postprocess TASK", post))
                 if not isinstance(sec, Mapping)]
        if lacks:
            raise InputError(f"{what} does not answer images: the artifact has no "
                             f"{' and no '.join(lacks)}: it takes tensors (convert it "
                             "with --preprocess/--postprocess to answer images)")
        assert isinstance(pre, Mapping) and isinstance(post, Mapping)
        task = post.get("task")
        if task not in TASKS:
            raise InputError(f"{what}: unknown post-processing task {task!r}")
        labels = extra.get("labels")
        names = tuple(str(x) for x in labels) if isinstance(labels, list) else None
        return cls(input=str(pre.get("input") or "image"), task=str(task), labels=names)

    def feed(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        """The feed for ``image`` (``[H, W, 3]`` or ``[N, H, W, 3]`` uint8) and whether it
        was one image (not a batch)."""
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise InputError(f"image: expected uint8 pixels, got {arr.dtype} (convert with "
                             ".astype(np.uint8) from 0..255 values)")
        single = arr.ndim == 3
        if single:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3 or min(arr.shape) < 1:
            raise InputError(f"image: expected [H, W, 3] or [N, H, W, 3] RGB, got shape "
                             f"{list(np.shape(image))}")
        return {self.input: np.ascontiguousarray(arr)}, single

    def answers(self, outputs: Mapping[str, np.ndarray], count: int) -> list[Answer]:
        """One :class:`Answer` per image of a batch of ``count``."""
        names = self.labels
        if self.task == "classify":
            scores, ids = outputs["scores"], outputs["class_ids"]
            return [Answer("classify", labels=tuple(
                Label(_name(names, int(c)), int(c), float(s))
                for s, c in zip(scores[i], ids[i], strict=True))) for i in range(count)]
        if self.task == "detect":
            boxes, scores = outputs["boxes"], outputs["scores"]
            ids, batch = outputs["class_ids"], outputs["batch_index"]
            per: list[list[Box]] = [[] for _ in range(count)]
            for b, s, c, n in zip(boxes.tolist(), scores.tolist(), ids.tolist(),
                                  batch.tolist(), strict=True):
                if 0 <= n < count:
                    per[n].append(Box(b[0], b[1], b[2], b[3], _name(names, c), s, c))
            return [Answer("detect", boxes=tuple(p)) for p in per]
        if self.task == "segment":
            cmap = outputs["class_map"]
            return [Answer("segment", class_map=cmap[i]) for i in range(count)]
        emb = outputs["embedding"]
        return [Answer("embed", embedding=emb[i]) for i in range(count)]


def as_image(img: Any, max_pixels: int) -> np.ndarray:
    """An array as it is, or a path (str / PathLike) or bytes decoded."""
    if isinstance(img, (str, os.PathLike, bytes)):
        if not isinstance(img, bytes) and not Path(img).is_file():
            raise InputError(f"{img}: no such image file")
        return decode_image(img, max_pixels=max_pixels)
    return np.asarray(img)


__all__ = ["IMAGES_EXTRA", "MAX_IMAGE_PIXELS", "Answer", "Box", "ImageTask", "ImageTooLarge",
           "Label", "NoImageDecoder", "as_image", "decode_image"]
