"""TFLite → ONNX, run in the framework child: tf2onnx reads the ``.tflite`` file.

The ONNX graph is the TFLite graph with its quantization removed (tf2onnx's
``dequantize``): the ONNX pipeline then builds its own candidates from float
weights. Inputs and outputs take the TFLite signature's names; a full-integer
model's int8 inputs and outputs are wrapped in QuantizeLinear / DequantizeLinear
with the model's own scale and zero point, so the ONNX model takes and returns
float32 as the TFLite Predictor does. The reference is the ``.tflite`` itself,
run in LiteRT.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import edge_sdk
from edge_sdk._internal import one_line
from edge_sdk.errors import ConversionError, EdgeError

from ._common import Loaded, quiet, rename_batch_dims, require

ONNX_OPSET = 17


class TfliteSource:
    """A ``.tflite`` model: LiteRT predicts, tf2onnx exports."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.predictor = edge_sdk.load(path)
        except EdgeError as err:
            raise ConversionError(f"{path}: not a TFLite model LiteRT can run: {err}") from err
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path))
        sigs = interp.get_signature_list()
        if sigs:
            runner = interp.get_signature_runner(next(iter(sigs)))
            ins = list(runner.get_input_details().items())
            outs = list(runner.get_output_details().items())
        else:
            ins = [(d["name"], d) for d in interp.get_input_details()]
            outs = [(d["name"], d) for d in interp.get_output_details()]
        # signature name → (tensor name, int8 (scale, zero point) or None)
        self.inputs = {n: (d["name"], _quant(d)) for n, d in ins}
        self.outputs = {n: (d["name"], _quant(d)) for n, d in outs}

    def reference(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.predictor.predict(dict(feed)).items()}

    def loaded(self) -> Loaded:
        return Loaded("tflite", tuple(self.predictor.inputs), self.reference,
                      {"tflite": {"converted_with": "tf2onnx"}})

    def export(self, out: Path) -> Path:
        with quiet():
            require("tensorflow", "converting a TFLite model to ONNX")
            try:
                import tf2onnx  # type: ignore[import-untyped]

                # from_tflite does not expose dequantize; the CLI passes it here.
                from tf2onnx.convert import _convert_common  # type: ignore[import-untyped]
            except ImportError as err:
                raise ConversionError(
                    f"{self.path}: TFLite → ONNX needs tf2onnx, which is not installed "
                    "(pip install 'edge-sdk[tensorflow]'); or keep it TFLite with --to tflite"
                ) from err
        raw = out.with_suffix(".raw.onnx")
        try:
            with quiet():
                _convert_common(
                    None, tflite_path=str(self.path), name=self.path.stem, opset=ONNX_OPSET,
                    input_names=[t for t, _ in self.inputs.values()],
                    output_names=[t for t, _ in self.outputs.values()],
                    dequantize=True, output_path=str(raw))
        except Exception as err:
            raise ConversionError(
                f"{self.path}: tf2onnx {getattr(tf2onnx, '__version__', '?')} cannot convert "
                f"this TFLite model: {one_line(err)}; keep it TFLite (--to tflite) or convert "
                "the framework source"
            ) from err
        self._rename(raw, out)
        rename_batch_dims(out)
        return out

    def _rename(self, raw: Path, out: Path) -> None:
        """Signature names outside, the tensor names inside; int8 I/O (de)quantized."""
        import onnx
        from onnx import TensorProto, helper

        model = onnx.load(str(raw))
        g = model.graph
        by_name = {vi.name: vi for vi in [*g.input, *g.output]}
        inits: list[Any] = []

        def bridge(sig: str, tensor: str, q: tuple[float, int] | None,
                   inward: bool) -> tuple[Any, Any | None]:
            """The graph's value info for ``sig`` and the node that joins it to ``tensor``
            (None: the same name): an Identity, or for int8 a (De)QuantizeLinear with the
            model's own scale and zero point so that the outside is float32."""
            vi = by_name[tensor]
            if q is None and sig == tensor:
                return vi, None
            elem = vi.type.tensor_type.elem_type
            shape = [d.dim_param or d.dim_value or None for d in vi.type.tensor_type.shape.dim]
            src, dst = (sig, tensor) if inward else (tensor, sig)
            if q is None:
                return (helper.make_tensor_value_info(sig, elem, shape),
                        helper.make_node("Identity", [src], [dst]))
            s, z = (f"{sig}__scale", f"{sig}__zero_point") if inward else \
                (f"{sig}__out_scale", f"{sig}__out_zero_point")
            inits.extend([helper.make_tensor(s, TensorProto.FLOAT, [], [q[0]]),
                          helper.make_tensor(z, elem, [], [q[1]])])
            op = "QuantizeLinear" if inward else "DequantizeLinear"
            return (helper.make_tensor_value_info(sig, TensorProto.FLOAT, shape),
                    helper.make_node(op, [src, s, z], [dst]))

        ins = [bridge(sig, t, q, True) for sig, (t, q) in self.inputs.items()]
        outs = [bridge(sig, t, q, False) for sig, (t, q) in self.outputs.items()]
        new_in, nodes = [vi for vi, _ in ins], [n for _, n in ins if n is not None]
        new_out, tail = [vi for vi, _ in outs], [n for _, n in outs if n is not None]
        body = list(g.node)
        del g.node[:]
        g.node.extend([*nodes, *body, *tail])
        g.initializer.extend(inits)
        del g.input[:]
        g.input.extend(new_in)
        del g.output[:]
        g.output.extend(new_out)
        onnx.save(model, str(out))


def _quant(d: Mapping[str, Any]) -> tuple[float, int] | None:
    if np.dtype(d["dtype"]) not in (np.dtype(np.int8), np.dtype(np.uint8)):
        return None
    scale, zp = d.get("quantization", (0.0, 0))
    return (float(scale), int(zp)) if scale else None


__all__ = ["TfliteSource"]
