"""Where the raw data of each tensor sits inside a model file (ONNX, ORT format, TFLite).

The host diffs two versions of a model tensor by tensor, and the device applies the
result as plain byte ranges, so this module only locates data and never decodes it.
It is imported on devices: stdlib only, and hostile bytes give an empty or partial
list, never an exception, after bounded time and memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["TensorRange", "tensor_ranges"]

_Buf = bytes | memoryview

#: Graph nesting followed (If/Loop/Scan bodies); real models nest a handful deep.
_MAX_DEPTH = 16
#: Protobuf fields or flatbuffer tables visited per file. A graph of ~300k nodes fits;
#: past it the ranges found so far are returned, so a crafted file of tiny fields costs
#: seconds, not minutes.
_MAX_STEPS = 4_000_000
#: Keys longer than this keep a prefix and a hash of the rest: TFLite's fused names run
#: to kilobytes, and a crafted name must not be copied into every key below it.
_MAX_NAME = 256

# Size of the scalar a byte shuffle should group by; complex types by their parts,
# so that every value is one the delta format accepts (1, 2, 4, 8).
_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4,
                  13: 8, 14: 4, 15: 8, 16: 2}
# TensorProto's packed typed fields: float_data and double_data hold little-endian
# scalars; int32_data, int64_data and uint64_data hold varints, which no width fits.
_ONNX_PACKED_ITEMSIZE = {4: 4, 10: 8, 5: 1, 7: 1, 11: 1}
_TFLITE_ITEMSIZE = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 8: 4, 9: 1, 10: 8, 11: 8,
                    12: 8, 15: 4, 16: 2, 18: 2}


@dataclass(frozen=True)
class TensorRange:
    """The raw data of one tensor: ``data[offset:offset + length]``.

    ``name`` finds the same tensor in another version of the model (see
    :func:`tensor_ranges`). ``itemsize`` (1, 2, 4 or 8) is the width of one stored
    scalar, to group bytes by; 1 when unknown or when the data is varint-encoded.
    """

    name: str
    offset: int
    length: int
    itemsize: int


def tensor_ranges(data: bytes | memoryview, fmt: str) -> list[TensorRange]:
    """The byte ranges of the tensors stored in the model file ``data``.

    ``fmt`` is a manifest format name: ``'onnx'``, ``'ort'`` or ``'tflite'`` (anything
    else is a ``ValueError``). The ranges are sorted by offset, non-overlapping, inside
    ``data`` and never empty. Bytes that cannot be parsed give ``[]`` or the ranges found
    before the damage; nothing else is raised. ``data`` is read in place, never copied.

    Names are unique within a file and built so that they match across versions:

    - ONNX: an initializer's name; ``<name>/values`` and ``<name>/indices`` for a sparse
      initializer; ``<node>/<attribute>`` for a tensor held by a node (a Constant's
      ``value``), with ``/<i>`` for the i-th of a list. ``<node>`` is the node's name,
      else its first output, else ``#<index in its graph>``. Tensors of a subgraph
      (If, Loop) are prefixed by ``<node>/<attribute>/``; those of a function by
      ``function:<domain>:<name>/`` and of training graphs by ``training<i>/<graph>/``.
      ``raw_data`` is mapped, else packed ``float_data``/``double_data`` (itemsize 4/8)
      or ``int32_data``/``int64_data``/``uint64_data`` (varints, itemsize 1). Tensors
      in external files or as ``string_data`` have no range.
    - ORT: the same scheme over the flatbuffer's initializers, sparse initializers and
      node attributes (raw data only); onnxruntime has made Constant nodes initializers
      named after their output.
    - TFLite: a buffer is named after the first tensor using it (subgraph order), else
      after the metadata entry naming it (``metadata:<name>``), else ``buffer:<index>``.
      Data after the flatbuffer (``offset``/``size`` of models over 2 GB) is mapped
      too; external buffer groups are not.

    A key that would exceed 256 characters is cut and ends in ``~`` and a hash of the
    whole; a key seen before gets ``#2``, ``#3``, ... in the order the file is walked.
    """
    walk = _WALKERS.get(fmt)
    if walk is None:
        raise ValueError(f"unknown model format {fmt!r} (expected onnx, ort or tflite)")
    buf: _Buf = data if isinstance(data, bytes) else memoryview(data).cast("B")
    found = _Found(len(buf))
    with contextlib.suppress(_Exhausted):
        walk(buf, found)
    return found.finish()


class _Malformed(Exception):
    """A flatbuffer read out of bounds; the item being read is skipped."""


class _Exhausted(Exception):
    """The step budget is spent; the ranges found so far are the answer."""


class _Found:
    """Ranges found so far, with unique names, and the step budget of the walk."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ranges: list[TensorRange] = []
        self._names: set[str] = set()
        self._next_suffix: dict[str, int] = {}
        self._steps = _MAX_STEPS

    def step(self) -> None:
        self._steps -= 1
        if self._steps < 0:
            raise _Exhausted

    def add(self, name: str, offset: int, length: int, itemsize: int) -> None:
        if length <= 0 or offset < 0 or offset + length > self.size:
            return
        if name in self._names:
            n = self._next_suffix.get(name, 2)
            while f"{name}#{n}" in self._names:
                n += 1
            self._next_suffix[name] = n + 1
            name = f"{name}#{n}"
        self._names.add(name)
        self._ranges.append(TensorRange(name, offset, length, itemsize))

    def finish(self) -> list[TensorRange]:
        # Well-formed files never overlap; a crafted flatbuffer can point two buffers at
        # the same bytes, and then the first one walked keeps them.
        order = sorted(range(len(self._ranges)),
                       key=lambda i: (self._ranges[i].offset, i))
        out: list[TensorRange] = []
        end = 0
        for i in order:
            r = self._ranges[i]
            if r.offset >= end:
                out.append(r)
                end = r.offset + r.length
        return out


def _short(name: str) -> str:
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.blake2b(name.encode("utf-8", "replace"), digest_size=8).hexdigest()
    return name[:_MAX_NAME - 17] + "~" + digest


def _text(raw: _Buf) -> str:
    return _short(bytes(raw).decode("utf-8", "replace"))


# --- ONNX: protobuf wire format -----------------------------------------------------------

_Field = tuple[int, int, int, int]
_Span = tuple[int, int]


def _varint(buf: _Buf, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it), or position -1 when the varint is cut or too long."""
    result = shift = 0
    while pos < end and shift < 70:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    return 0, -1


def _fields(buf: _Buf, start: int, end: int, found: _Found) -> Iterator[_Field]:
    """(field number, wire type, value or payload start, payload end) of a message's
    varint and length-delimited fields; ends quietly at the first malformed byte."""
    pos = start
    while pos < end:
        found.step()
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
            if pos < 0:
                return
        field, wire = key >> 3, key & 7
        if field == 0:
            return
        if wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos < 0 or length > end - pos:
                return
            yield field, 2, pos, pos + length
            pos += length
        elif wire == 0:
            value, pos = _varint(buf, pos, end)
            if pos < 0:
                return
            yield field, 0, value, pos
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:  # groups: not used by ONNX, so the bytes are not an ONNX message
            return
    return


def _onnx(buf: _Buf, found: _Found) -> None:
    graphs: list[_Span] = []
    training: list[_Span] = []
    functions: list[_Span] = []
    for field, wire, a, b in _fields(buf, 0, len(buf), found):
        if wire == 2:
            if field == 7:  # ModelProto.graph
                graphs.append((a, b))
            elif field == 20:  # training_info
                training.append((a, b))
            elif field == 25:  # functions
                functions.append((a, b))
    for a, b in graphs:
        _onnx_graph(buf, a, b, "", 0, found)
    for i, (a, b) in enumerate(training):
        for field, wire, c, d in _fields(buf, a, b, found):
            # TrainingInfoProto.initialization = 1, algorithm = 2
            if wire == 2 and field in (1, 2):
                part = "initialization" if field == 1 else "algorithm"
                _onnx_graph(buf, c, d, f"training{i}/{part}/", 1, found)
    for a, b in functions:
        _onnx_function(buf, a, b, found)


def _onnx_graph(buf: _Buf, start: int, end: int, prefix: str, depth: int,
                found: _Found) -> None:
    if depth > _MAX_DEPTH:
        return
    nodes: list[_Span] = []
    initializers = sparse = 0
    for field, wire, a, b in _fields(buf, start, end, found):
        if wire == 2:
            if field == 1:
                nodes.append((a, b))
            elif field == 5:
                _onnx_tensor(buf, a, b, prefix, None, f"initializer#{initializers}", found)
                initializers += 1
            elif field == 15:
                _onnx_sparse(buf, a, b, prefix, None, f"sparse_initializer#{sparse}", found)
                sparse += 1
    # Nodes last: initializers hold nearly all the bytes, so a graph with more nodes
    # than the step budget still gets its weights mapped.
    for i, (a, b) in enumerate(nodes):
        _onnx_node(buf, a, b, prefix, i, depth, found)


def _onnx_tensor(buf: _Buf, start: int, end: int, prefix: str, key: str | None,
                 fallback: str, found: _Found) -> None:
    """Map a TensorProto under ``prefix + key``, or its own name when ``key`` is None."""
    dtype = 0
    name: _Span | None = None
    raw: _Span | None = None
    typed: tuple[int, int, int] | None = None
    for field, wire, a, b in _fields(buf, start, end, found):
        if wire == 0:
            if field == 2:
                dtype = a
        elif field == 9:
            raw = (a, b)
        elif field == 8:
            name = (a, b)
        elif field in _ONNX_PACKED_ITEMSIZE and typed is None:
            typed = (a, b, _ONNX_PACKED_ITEMSIZE[field])
    if raw is not None and raw[1] > raw[0]:
        offset, stop, itemsize = raw[0], raw[1], _ONNX_ITEMSIZE.get(dtype, 1)
    elif typed is not None:
        offset, stop, itemsize = typed
    else:
        return
    if key is None:
        key = _text(buf[name[0]:name[1]]) if name is not None else ""
        key = key or fallback
    found.add(_short(prefix + key), offset, stop - offset, itemsize)


def _onnx_sparse(buf: _Buf, start: int, end: int, prefix: str, key: str | None,
                 fallback: str, found: _Found) -> None:
    """Map a SparseTensorProto's values and indices; ``key`` None: named by its values."""
    values: _Span | None = None
    indices: _Span | None = None
    for field, wire, a, b in _fields(buf, start, end, found):
        if wire == 2:
            if field == 1:
                values = (a, b)
            elif field == 2:
                indices = (a, b)
    if key is None:
        key = _onnx_tensor_name(buf, values, found) or fallback
    base = _short(prefix + key)
    if values is not None:
        _onnx_tensor(buf, values[0], values[1], base, "/values", "", found)
    if indices is not None:
        _onnx_tensor(buf, indices[0], indices[1], base, "/indices", "", found)


def _onnx_tensor_name(buf: _Buf, span: _Span | None, found: _Found) -> str:
    if span is None:
        return ""
    name = ""
    for field, wire, a, b in _fields(buf, span[0], span[1], found):
        if field == 8 and wire == 2:
            name = _text(buf[a:b])
    return name


def _onnx_node(buf: _Buf, start: int, end: int, prefix: str, index: int, depth: int,
               found: _Found) -> None:
    name: _Span | None = None
    output: _Span | None = None
    attributes: list[_Span] = []
    for field, wire, a, b in _fields(buf, start, end, found):
        if wire == 2:
            if field == 5:
                attributes.append((a, b))
            elif field == 3:
                name = (a, b)
            elif field == 2 and output is None:
                output = (a, b)
    node_key: str | None = None
    for a, b in attributes:
        held = _onnx_attribute(buf, a, b, found)
        if held is None:
            continue
        if node_key is None:
            node_key = _text(buf[name[0]:name[1]]) if name is not None else ""
            if not node_key and output is not None:
                node_key = _text(buf[output[0]:output[1]])
            node_key = node_key or f"#{index}"
        attr_name, items = held
        here = _short(f"{prefix}{node_key}/{attr_name}")
        listed: dict[int, int] = {}
        for field, a2, b2 in items:
            if field in (10, 11, 23):  # repeated: tensors, graphs, sparse_tensors
                n = listed.get(field, 0)
                listed[field] = n + 1
                where = _short(f"{here}/{n}")
            else:
                where = here
            if field in (5, 10):
                _onnx_tensor(buf, a2, b2, where, "", "", found)
            elif field in (22, 23):
                _onnx_sparse(buf, a2, b2, where, "", "", found)
            else:
                _onnx_graph(buf, a2, b2, where + "/", depth + 1, found)


def _onnx_attribute(buf: _Buf, start: int, end: int,
                    found: _Found) -> tuple[str, list[tuple[int, int, int]]] | None:
    """(attribute name, [(field, start, end)] of its tensors and graphs), or None."""
    name = ""
    items: list[tuple[int, int, int]] = []
    for field, wire, a, b in _fields(buf, start, end, found):
        if wire == 2:
            # t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22, sparse_tensors = 23
            if field in (5, 6, 10, 11, 22, 23):
                items.append((field, a, b))
            elif field == 1:
                name = _text(buf[a:b])
    return (name or "?", items) if items else None


def _onnx_function(buf: _Buf, start: int, end: int, found: _Found) -> None:
    name = domain = overload = ""
    nodes: list[_Span] = []
    for field, wire, a, b in _fields(buf, start, end, found):
        if wire == 2:
            # FunctionProto.name = 1, node = 7, domain = 10, overload = 13
            if field == 7:
                nodes.append((a, b))
            elif field == 1:
                name = _text(buf[a:b])
            elif field == 10:
                domain = _text(buf[a:b])
            elif field == 13:
                overload = _text(buf[a:b])
    prefix = f"function:{domain}:{name}" + (f":{overload}" if overload else "")
    prefix = _short(prefix) + "/"
    for i, (a, b) in enumerate(nodes):
        _onnx_node(buf, a, b, prefix, i, 1, found)


# --- Flatbuffers (TFLite, ORT format) -------------------------------------------------

_I8 = struct.Struct("<b")
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _FlatBuffer:
    """Bounds-checked reads of a flatbuffer: a read outside the data raises
    :class:`_Malformed`. Table fields are addressed by their index in the schema."""

    def __init__(self, buf: _Buf, found: _Found) -> None:
        self._buf = buf
        self._size = len(buf)
        self._found = found
        self._strings: dict[int, str] = {}

    def _read(self, fmt: struct.Struct, pos: int) -> int:
        if pos < 0 or pos + fmt.size > self._size:
            raise _Malformed
        value: int = fmt.unpack_from(self._buf, pos)[0]
        return value

    def root(self) -> int:
        return self._read(_U32, 0)

    def _field(self, table: int, index: int) -> int | None:
        vtable = table - self._read(_I32, table)
        slot = 4 + 2 * index
        if slot + 2 > self._read(_U16, vtable):
            return None
        offset = self._read(_U16, vtable + slot)
        return table + offset if offset else None

    def scalar(self, table: int, index: int, fmt: struct.Struct, default: int = 0) -> int:
        pos = self._field(table, index)
        return default if pos is None else self._read(fmt, pos)

    def table(self, table: int, index: int) -> int | None:
        pos = self._field(table, index)
        return None if pos is None else pos + self._read(_U32, pos)

    def vector(self, table: int, index: int, elem_size: int) -> tuple[int, int]:
        """(position of the first element, count); (0, 0) when absent."""
        pos = self.table(table, index)
        if pos is None:
            return 0, 0
        count = self._read(_U32, pos)
        if pos + 4 + count * elem_size > self._size:
            raise _Malformed
        return pos + 4, count

    def string(self, table: int, index: int) -> str:
        """The string field, '' when absent."""
        pos = self.table(table, index)
        return "" if pos is None else self._string_at(pos)

    def first_string(self, table: int, index: int) -> str:
        """The first string of a vector-of-strings field, '' when absent or empty."""
        start, count = self.vector(table, index, 4)
        return self._string_at(start + self._read(_U32, start)) if count else ""

    def _string_at(self, pos: int) -> str:
        # Decoded once per position: a crafted file can name every table by one string.
        text = self._strings.get(pos)
        if text is None:
            length = self._read(_U32, pos)
            if pos + 4 + length > self._size:
                raise _Malformed
            text = self._strings[pos] = _text(self._buf[pos + 4:pos + 4 + length])
        return text

    def tables(self, table: int, index: int) -> Iterator[int]:
        """Positions of the tables in a vector field; none when it is absent or bad."""
        try:
            start, count = self.vector(table, index, 4)
        except _Malformed:
            return
        for i in range(count):
            self._found.step()
            pos = start + 4 * i
            yield pos + self._read(_U32, pos)


def _each(items: Iterator[int], visit: Callable[[int, int], None]) -> None:
    """``visit(index, table)`` for each table; a malformed one is skipped."""
    for i, table in enumerate(items):
        try:
            visit(i, table)
        except _Malformed:
            continue


def _tflite(buf: _Buf, found: _Found) -> None:
    fb = _FlatBuffer(buf, found)
    try:
        model = fb.root()
        buffers = list(fb.tables(model, 4))  # Model.buffers
        subgraphs = list(fb.tables(model, 2))
        metadata = list(fb.tables(model, 6))
    except _Malformed:
        return
    owners: dict[int, tuple[str, int]] = {}

    def tensor(_: int, t: int) -> None:
        index = fb.scalar(t, 2, _U32)  # Tensor.buffer; 0 is the empty sentinel buffer
        if 0 < index < len(buffers) and index not in owners:
            itemsize = _TFLITE_ITEMSIZE.get(fb.scalar(t, 1, _I8), 1)  # Tensor.type
            owners[index] = (fb.string(t, 3) or f"buffer:{index}", itemsize)

    def subgraph(_: int, sg: int) -> None:
        _each(fb.tables(sg, 0), tensor)

    def entry(_: int, md: int) -> None:
        index = fb.scalar(md, 1, _U32)  # Metadata.buffer
        if 0 < index < len(buffers) and index not in owners:
            owners[index] = (_short("metadata:" + fb.string(md, 0)), 1)

    def buffer(i: int, b: int) -> None:
        name, itemsize = owners.get(i, (f"buffer:{i}", 1))
        start, count = fb.vector(b, 0, 1)  # Buffer.data
        if count:
            found.add(name, start, count, itemsize)
            return
        # Models over 2 GB keep data after the flatbuffer, at an offset from the start
        # of the file; offsets 0 and 1 mean none.
        offset = fb.scalar(b, 1, _U64)
        if offset > 1:
            found.add(name, offset, fb.scalar(b, 2, _U64), itemsize)

    _each(iter(subgraphs), subgraph)
    _each(iter(metadata), entry)
    _each(iter(buffers), buffer)


def _ort(buf: _Buf, found: _Found) -> None:
    fb = _FlatBuffer(buf, found)
    try:
        model = fb.table(fb.root(), 1)  # InferenceSession.model
        graph = None if model is None else fb.table(model, 7)  # Model.graph
    except _Malformed:
        return
    if graph is not None:
        _ort_graph(fb, graph, "", 0, found, set())


def _ort_graph(fb: _FlatBuffer, graph: int, prefix: str, depth: int, found: _Found,
               seen: set[int]) -> None:
    # A crafted file can point many attributes at one graph: walk each graph once.
    if depth > _MAX_DEPTH or graph in seen:
        return
    seen.add(graph)

    def initializer(i: int, t: int) -> None:
        _ort_tensor(fb, t, prefix, None, f"initializer#{i}", found)

    def sparse(i: int, s: int) -> None:
        _ort_sparse(fb, s, prefix, None, f"sparse_initializer#{i}", found)

    def node(i: int, n: int) -> None:
        _ort_node(fb, n, i, prefix, depth, found, seen)

    _each(fb.tables(graph, 0), initializer)  # Graph.initializers
    _each(fb.tables(graph, 7), sparse)  # Graph.sparse_initializers
    _each(fb.tables(graph, 2), node)  # Graph.nodes


def _ort_tensor(fb: _FlatBuffer, t: int, prefix: str, key: str | None, fallback: str,
                found: _Found) -> None:
    """Map a Tensor's raw_data under ``prefix + key``, or its own name when ``key`` is None."""
    start, count = fb.vector(t, 4, 1)  # Tensor.raw_data
    if not count:
        return
    itemsize = _ONNX_ITEMSIZE.get(fb.scalar(t, 3, _I32), 1)  # Tensor.data_type
    if key is None:
        key = fb.string(t, 0) or fallback  # Tensor.name
    found.add(_short(prefix + key), start, count, itemsize)


def _ort_sparse(fb: _FlatBuffer, s: int, prefix: str, key: str | None, fallback: str,
                found: _Found) -> None:
    values = fb.table(s, 0)  # SparseTensor.values
    indices = fb.table(s, 1)
    if key is None:
        key = (fb.string(values, 0) if values is not None else "") or fallback
    base = _short(prefix + key)
    for part, t in (("/values", values), ("/indices", indices)):
        if t is not None:
            try:
                _ort_tensor(fb, t, base, part, "", found)
            except _Malformed:
                continue


def _ort_node(fb: _FlatBuffer, node: int, index: int, prefix: str, depth: int,
              found: _Found, seen: set[int]) -> None:
    node_key: str | None = None

    def key() -> str:
        nonlocal node_key
        if node_key is None:
            # Node.name, else Node.outputs[0]
            node_key = fb.string(node, 0) or fb.first_string(node, 9) or f"#{index}"
        return node_key

    def attribute(_: int, attr: int) -> None:
        t = fb.table(attr, 6)  # Attribute.t
        g = fb.table(attr, 7)  # Attribute.g
        tensors = list(fb.tables(attr, 11))
        graphs = list(fb.tables(attr, 12))
        if t is None and g is None and not tensors and not graphs:
            return
        here = _short(f"{prefix}{key()}/{fb.string(attr, 0) or '?'}")
        if t is not None:
            _ort_tensor(fb, t, here, "", "", found)
        _each(iter(tensors), lambda i, t2: _ort_tensor(fb, t2, here, f"/{i}", "", found))
        if g is not None:
            _ort_graph(fb, g, here + "/", depth + 1, found, seen)
        _each(iter(graphs), lambda i, g2: _ort_graph(
            fb, g2, _short(f"{here}/{i}") + "/", depth + 1, found, seen))

    _each(fb.tables(node, 10), attribute)  # Node.attributes


_WALKERS: dict[str, Callable[[_Buf, _Found], None]] = {
    "onnx": _onnx, "ort": _ort, "tflite": _tflite,
}
