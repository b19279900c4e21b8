"""A small detector that answers boxes in the photo's own pixels: converted with its
letterbox, YOLOv8 decode and NMS inside the signed graph, deployed to a device agent
and asked with image files.

    python examples/detect_images.py [WORK_DIR]

Builds a detector with YOLOv8's output layout (a stand-in for ``yolov8n.onnx``: input
float ``[N, 3, 128, 128]`` in [0, 1], output ``[N, 4 + classes, anchors]`` of
``cx, cy, w, h`` and class scores), whose fixed weights find the box around each red,
green and blue shape, writes its labels and a few photos, then converts with

    edge-sdk convert shapes.onnx -o shapes-art --eval photos.npz --quantize none \\
        --preprocess image:size=128x128,resize=letterbox,scale=1/255 \\
        --postprocess detect:layout=yolov8,score=0.25,iou=0.45,max=10 --labels labels.txt

so that the artifact takes a JPEG/PNG's pixels (uint8, any size) and answers boxes in
that image's pixels (the letterbox undone) with labels and scores. It answers
``edge-sdk predict --image``, then, deployed to an agent, an image body POSTed to
``/v2/models/shapes/infer`` and a tritonclient request with the image as a UINT8 tensor.

Needs the ``convert``, ``agent`` and ``agent-images`` extras, ``tritonclient[http]`` and a
broker (the system Mosquitto, else amqtt from the ``demo`` extra), as ``demo.py`` does.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from _on_agent import deployed, post_image
from demo import run, step
from onnx import TensorProto, helper, numpy_helper

LABELS = ["red", "green", "blue"]
SIZE = 128
ANCHORS = 16
#: (file, [(label, colour RGB, box x0 y0 x1 y1 in the photo's pixels, shape)]) per photo.
PHOTOS = [
    ("street.jpg", [("red", (215, 35, 40), (40, 30, 120, 110), "disc"),
                    ("blue", (40, 80, 210), (170, 90, 280, 170), "bar")]),
    ("park.png", [("green", (40, 170, 60), (60, 100, 180, 220), "disc"),
                  ("red", (215, 35, 40), (20, 20, 70, 60), "bar")]),
]


def build_model(path: Path, size: int = SIZE) -> None:
    """Per class, a 1x1 conv scores how much each pixel leans to its colour; the box is
    the extent of the pixels over 0.6, its score the share of that box they fill. One
    anchor per class, padded to 16 anchors: output ``[N, 4 + 3, 16]`` (YOLOv8: boxes
    then class scores)."""
    c = len(LABELS)
    lean = np.full((c, 3, 1, 1), -1.0, np.float32)
    for k in range(c):
        lean[k, k] = 2.0
    ramp = np.arange(size, dtype=np.float32)
    f = np.float32
    inits = [numpy_helper.from_array(lean, "lean"),
             numpy_helper.from_array(np.full(c, -0.6, f), "thresh"),
             numpy_helper.from_array(ramp, "ramp"),
             numpy_helper.from_array(ramp + 1, "ramp1"),
             numpy_helper.from_array(np.array(2.0 * size, f), "far"),
             numpy_helper.from_array(np.array(0.5, f), "half"),
             numpy_helper.from_array(np.array(1.0, f), "one"),
             numpy_helper.from_array(np.array(20.0, f), "gain"),
             numpy_helper.from_array(np.array(0.0, f), "zero"),
             numpy_helper.from_array(np.eye(c, ANCHORS, dtype=f), "spread"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "hw"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    n = helper.make_node
    nodes = [n("Conv", ["images", "lean", "thresh"], ["lean_map"]),
             n("Mul", ["lean_map", "gain"], ["steep"]),
             n("Clip", ["steep", "zero", "one"], ["mask"]),              # [N, C, H, W]
             n("ReduceSum", ["mask", "hw"], ["filled"], keepdims=0)]     # [N, C]
    for axis, lo, hi in ((2, "y0", "y1"), (3, "x0", "x1")):
        other = 3 if axis == 2 else 2
        nodes += [n("ReduceMax", ["mask"], [f"{lo}_p"], axes=[other], keepdims=0),  # [N, C, S]
                  n("Greater", [f"{lo}_p", "half"], [f"{lo}_b"]),
                  n("Cast", [f"{lo}_b"], [f"{lo}_on"], to=TensorProto.FLOAT),
                  n("Sub", ["one", f"{lo}_on"], [f"{lo}_off"]),
                  n("Mul", [f"{lo}_off", "far"], [f"{lo}_pen"]),
                  n("Add", ["ramp", f"{lo}_pen"], [f"{lo}_cand"]),
                  n("ReduceMin", [f"{lo}_cand"], [lo], axes=[2], keepdims=0),
                  n("Mul", ["ramp1", f"{lo}_on"], [f"{hi}_cand"]),
                  n("ReduceMax", [f"{hi}_cand"], [hi], axes=[2], keepdims=0)]
    nodes += [n("Add", ["x0", "x1"], ["xs"]), n("Mul", ["xs", "half"], ["cx"]),
              n("Add", ["y0", "y1"], ["ys"]), n("Mul", ["ys", "half"], ["cy"]),
              n("Sub", ["x1", "x0"], ["w"]), n("Sub", ["y1", "y0"], ["h"]),
              n("Mul", ["w", "h"], ["area"]), n("Max", ["area", "one"], ["area1"]),
              n("Div", ["filled", "area1"], ["solid"]),
              n("Min", ["solid", "one"], ["score"])]                      # [N, C]
    for v in ("cx", "cy", "w", "h", "score"):  # [N, C] -> [N, 1, ANCHORS]
        nodes += [n("MatMul", [v, "spread"], [f"{v}_a"]),
                  n("Unsqueeze", [f"{v}_a", "ax1"], [f"{v}_u"])]
    nodes += [n("Mul", ["score_u", "spread"], ["scores"]),               # [N, C, ANCHORS]
              n("Concat", ["cx_u", "cy_u", "w_u", "h_u", "scores"], ["output0"], axis=1)]
    graph = helper.make_graph(
        nodes, "shapes",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 4 + c, ANCHORS])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def draw(h: int, w: int, shapes: list[tuple[str, tuple[int, int, int],
                                            tuple[int, int, int, int], str]],
         seed: int) -> np.ndarray:
    """A light, noisy background with each shape filling its box (a disc or a bar)."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(225, 10, (h, w, 3)), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    for _, colour, (x0, y0, x1, y1), kind in shapes:
        inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        if kind == "disc":
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            inside &= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        img[inside] = np.clip(np.asarray(colour) + rng.normal(0, 8, (int(inside.sum()), 3)),
                              0, 255)
    return img.astype(np.uint8)


def random_shapes(rng: np.random.Generator, h: int, w: int) -> list[
        tuple[str, tuple[int, int, int], tuple[int, int, int, int], str]]:
    colours = {"red": (215, 35, 40), "green": (40, 170, 60), "blue": (40, 80, 210)}
    out = []
    for label in rng.permutation(LABELS)[:2]:
        bw, bh = int(rng.integers(30, w // 2)), int(rng.integers(30, h // 2))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        out.append((str(label), colours[str(label)], (x0, y0, x0 + bw, y0 + bh),
                    str(rng.choice(["disc", "bar"]))))
    return out


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def main(work: Path) -> None:
    from PIL import Image

    step("a detector with YOLOv8's output layout, its labels and photos")
    src = work / "shapes.onnx"
    build_model(src)
    (work / "labels.txt").write_text("".join(f"{name}\n" for name in LABELS))
    for i, (file, shapes) in enumerate(PHOTOS):
        Image.fromarray(draw(240, 320, shapes, seed=i)).save(work / file, quality=95)
    rng = np.random.default_rng(7)
    np.savez(work / "photos.npz", image=np.stack(
        [draw(150, 200, random_shapes(rng, 150, 200), seed=20 + i) for i in range(12)]))
    print(f"wrote {src.name}, labels.txt ({', '.join(LABELS)}), "
          f"{', '.join(p[0] for p in PHOTOS)} (320x240) and photos.npz")

    step("convert with the letterbox, the decode and NMS inside the graph")
    art = work / "shapes-art"
    run("convert", str(src), "-o", str(art), "--name", "shapes", "--eval",
        str(work / "photos.npz"), "--quantize", "none", "--threads", "1",
        "--preprocess", f"image:size={SIZE}x{SIZE},resize=letterbox,scale=1/255",
        "--postprocess", "detect:layout=yolov8,score=0.25,iou=0.45,max=10",
        "--labels", str(work / "labels.txt"), "--overwrite")

    step("answer an image file on the command line")
    for file, _ in PHOTOS:
        run("predict", str(art), "--image", str(work / file))

    with deployed(work, art) as port:
        step("POST image files to the agent (curl -H 'Content-Type: image/png' "
             "--data-binary @park.png)")
        for file, shapes in PHOTOS:
            answer = post_image(port, "shapes", work / file)
            boxes = answer["boxes"]
            assert isinstance(boxes, list)
            print(f"POST {file} -> {len(boxes)} boxes")
            for b in boxes:
                got = (b["x0"], b["y0"], b["x1"], b["y1"])
                drawn = next((s[2] for s in shapes if s[0] == b["label"]), None)
                match = f"IoU {iou(got, drawn):.2f} with the {b['label']} shape drawn at " \
                    f"{drawn}" if drawn else "no such shape drawn"
                print(f"  {b['label']:<5} {b['score']:.2f} at "
                      f"({', '.join(f'{v:.1f}' for v in got)}): {match}")
            if sorted(b["label"] for b in boxes) != sorted(s[0] for s in shapes):
                raise SystemExit(f"example: {file}: labels {[b['label'] for b in boxes]}")

        step("tritonclient: the image as a UINT8 tensor, boxes, scores and class ids back")
        import tritonclient.http as httpclient

        img = np.asarray(Image.open(work / "park.png").convert("RGB"))[None]
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        try:
            feed = httpclient.InferInput("image", list(img.shape), "UINT8")
            feed.set_data_from_numpy(img)
            res = client.infer("shapes", [feed], outputs=[
                httpclient.InferRequestedOutput(o) for o in ("boxes", "scores", "class_ids")])
        finally:
            client.close()
        boxes, scores, ids = (res.as_numpy(o) for o in ("boxes", "scores", "class_ids"))
        assert boxes is not None and scores is not None and ids is not None
        print(f"infer('shapes', image park.png {list(img.shape)} UINT8) ->")
        for box, score, k in zip(boxes, scores, ids, strict=True):
            print(f"  class_ids {int(k)} ({LABELS[int(k)]}), scores {float(score):.2f}, "
                  f"boxes [{', '.join(f'{v:.1f}' for v in box)}]")
    print("\ndetect_images finished OK")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
