"""The part of edge_sdk's internals that ``converters`` and ``device_agent`` may use.

Not a public API: user code and examples use ``edge_sdk``, ``edge_sdk.errors``,
``edge_sdk.transport``, ``edge_sdk.trust``, ``edge_sdk.profiling`` and
``edge_sdk.release``. The sibling packages ship in the same distribution and change
together with edge_sdk, so they may also use the helpers below, and only these: every
other underscored module of edge_sdk stays edge_sdk's own (``lint-imports`` enforces
it, see ``[tool.importlinter]`` in pyproject.toml). A name moves here deliberately, when a
sibling needs it, never by reaching into the module that defines it.

- files: :func:`atomic_write_bytes`, :func:`atomic_write_text` (temp file + fsync +
  ``os.replace``), :func:`staged_dir` (a directory that appears whole or not at
  all), :func:`sha256_file`;
- artifacts: :data:`MANIFEST_NAME`, :data:`REPORT_NAME` (file names inside an
  artifact directory), :func:`load_model_file` (a Predictor for a bare model file),
  :func:`litert_op_names` (the ops of a LiteRT interpreter's graph);
- data: :func:`load_npz` (an ``.npz`` of named arrays), :func:`synthetic_inputs`
  (random feeds matching a signature), :func:`search_input_shapes` → :class:`ShapeSearch`
  (shapes a model with symbolic dims runs on), :func:`concrete_specs`,
  :func:`symbolic_dims`, :func:`shape_text`, :func:`measure` → :class:`LatencyStats`;
- messages: :func:`loads_bounded` with :data:`MESSAGE_MAX_BYTES` and
  :data:`MESSAGE_MAX_DEPTH` (JSON from the network, bounded in size and depth);
- HTTP: :func:`parse_head` → :class:`RequestHead`, raising :class:`HeadError` (the
  strict request-head reader the fleet page and the agent share), :func:`check_host` and
  :func:`host_name` (DNS rebinding);
- images: :func:`decode_image` (a JPEG/PNG, its pixel count bounded before decoding,
  raising :class:`ImageTooLarge` or :class:`NoImageDecoder` with :data:`IMAGES_EXTRA`),
  :class:`ImageTask` (an artifact's image feed and its outputs as answers);
- errors: :func:`one_line` with :data:`CAUSE_CHARS` (another library's exception quoted
  in a one-line diagnosis);
- secrets: :func:`redact_url` (a URL as a message may show it), :func:`add_secret` (a
  value never to be printed).
"""

from ._answers import IMAGES_EXTRA, ImageTask, ImageTooLarge, NoImageDecoder, decode_image
from ._artifact import MANIFEST_NAME, REPORT_NAME
from ._bench import (
    LatencyStats,
    ShapeSearch,
    concrete_specs,
    index_bound,
    measure,
    runtime_error_text,
    runtime_load_error_text,
    search_input_shapes,
    shape_text,
    symbolic_dims,
    synthetic_inputs,
)
from ._fs import atomic_write_bytes, atomic_write_text, sha256_file, staged_dir
from ._http import HeadError, RequestHead, check_host, host_name, parse_head, reason
from ._io import load_npz, npz_bytes
from ._json import MESSAGE_MAX_BYTES, MESSAGE_MAX_DEPTH, loads_bounded
from ._oneline import CAUSE_CHARS, one_line
from ._redact import add_secret, redact_url
from ._runtime import litert_op_names, load_model_file

__all__ = [
    "CAUSE_CHARS",
    "IMAGES_EXTRA",
    "MANIFEST_NAME",
    "MESSAGE_MAX_BYTES",
    "MESSAGE_MAX_DEPTH",
    "REPORT_NAME",
    "HeadError",
    "ImageTask",
    "ImageTooLarge",
    "LatencyStats",
    "NoImageDecoder",
    "RequestHead",
    "ShapeSearch",
    "add_secret",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_host",
    "concrete_specs",
    "decode_image",
    "host_name",
    "index_bound",
    "litert_op_names",
    "load_model_file",
    "load_npz",
    "loads_bounded",
    "measure",
    "npz_bytes",
    "one_line",
    "parse_head",
    "reason",
    "redact_url",
    "runtime_error_text",
    "runtime_load_error_text",
    "search_input_shapes",
    "sha256_file",
    "shape_text",
    "staged_dir",
    "symbolic_dims",
    "synthetic_inputs",
]
