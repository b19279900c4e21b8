"""An image classifier that answers labels: converted with its pre- and post-processing
inside the signed graph, deployed to a device agent and asked with image files.

    python examples/classify_images.py [WORK_DIR]

Builds a small CNN (a stand-in for your model: fixed weights that tell the dominant
colour of a picture; input float ``[N, 3, 64, 64]`` in [-1, 1], logits out), writes its
labels and a few photos of coloured shapes, then converts with

    edge-sdk convert colours.onnx -o colours-art --eval photos.npz --quantize none \\
        --preprocess image:size=64x64,resize=stretch,scale=1/255,mean=0.5/0.5/0.5,std=0.5/0.5/0.5 \\
        --postprocess classify:topk=3 --labels labels.txt

so that the artifact takes a JPEG/PNG's pixels (uint8, any size) and answers labels with
scores. It answers ``edge-sdk predict --image``, then, deployed to an agent, an image
body POSTed to ``/v2/models/colours/infer`` (what ``curl --data-binary @photo.jpg``
sends) and tritonclient's classification extension (``class_count=K``).

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

LABELS = ["red", "green", "blue", "yellow"]
#: Logit of each class from the image's mean R, G, B: how far it leans to that colour.
LEAN = np.array([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.5], [-0.5, -0.5, 1.0],
                 [0.5, 0.5, -1.0]], np.float32)
#: (file, colour RGB, label) of the sample photos.
PHOTOS = [("apple.jpg", (210, 30, 40), "red"), ("leaf.png", (40, 170, 60), "green"),
          ("sky.jpg", (40, 90, 220), "blue")]


def build_model(path: Path, size: int = 64) -> None:
    """Conv 3x3 (a per-channel blur) + ReLU-free pooling, then a dense layer: the logits
    are ``8 * LEAN @ mean_rgb``."""
    blur = np.zeros((3, 3, 3, 3), np.float32)
    for c in range(3):
        blur[c, c] = 1 / 9
    inits = [numpy_helper.from_array(blur, "blur"),
             numpy_helper.from_array(8 * LEAN.T.copy(), "dense"),
             numpy_helper.from_array(np.zeros(len(LABELS), np.float32), "bias")]
    nodes = [helper.make_node("Conv", ["image", "blur"], ["c"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "dense", "bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "colours",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def photo(colour: tuple[int, int, int], h: int, w: int, seed: int) -> np.ndarray:
    """A light, noisy background with a disc and a bar of ``colour``."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(225, 12, (h, w, 3)), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, r = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w, 0.3 * min(h, w)
    shape = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) | (
        (abs(yy - 0.85 * h) < 0.06 * h) & (abs(xx - w / 2) < 0.4 * w))
    img[shape] = np.clip(np.asarray(colour) + rng.normal(0, 10, (int(shape.sum()), 3)),
                         0, 255)
    return img.astype(np.uint8)


def main(work: Path) -> None:
    from PIL import Image

    step("a model, its labels and photos")
    src = work / "colours.onnx"
    build_model(src)
    (work / "labels.txt").write_text("".join(f"{name}\n" for name in LABELS))
    for i, (file, colour, _) in enumerate(PHOTOS):
        Image.fromarray(photo(colour, 180, 240, seed=i)).save(work / file)
    # An evaluation set of raw images (one size per file): the whole pipeline is verified
    # on them against the source model run on a numpy reference of the same spec.
    colours = [(210, 30, 40), (40, 170, 60), (40, 90, 220), (220, 200, 40)]
    np.savez(work / "photos.npz", image=np.stack(
        [photo(colours[i % 4], 120, 160, seed=10 + i) for i in range(16)]))
    print(f"wrote {src.name}, labels.txt ({', '.join(LABELS)}), "
          f"{', '.join(p[0] for p in PHOTOS)} and photos.npz")

    step("convert with the pre- and post-processing inside the graph")
    art = work / "colours-art"
    run("convert", str(src), "-o", str(art), "--name", "colours", "--eval",
        str(work / "photos.npz"), "--quantize", "none", "--threads", "1",
        "--preprocess", "image:size=64x64,resize=stretch,scale=1/255,mean=0.5/0.5/0.5,"
        "std=0.5/0.5/0.5", "--postprocess", "classify:topk=3", "--labels",
        str(work / "labels.txt"), "--overwrite")

    step("answer an image file on the command line")
    for file, _, _ in PHOTOS:
        run("predict", str(art), "--image", str(work / file))

    with deployed(work, art) as port:
        step("POST image files to the agent (curl -H 'Content-Type: image/jpeg' "
             "--data-binary @apple.jpg)")
        for file, _, want in PHOTOS:
            answer = post_image(port, "colours", work / file)
            labels = answer["labels"]
            assert isinstance(labels, list)
            print(f"POST {file} -> " + ", ".join(
                f"{lb['name']} {lb['score']:.3f}" for lb in labels))
            if labels[0]["name"] != want:
                raise SystemExit(f"example: {file} answered {labels[0]['name']}, not {want}")

        step("tritonclient with the classification extension (class_count=2)")
        import tritonclient.http as httpclient

        img = np.asarray(Image.open(work / "sky.jpg").convert("RGB"))[None]
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        try:
            feed = httpclient.InferInput("image", list(img.shape), "UINT8")
            feed.set_data_from_numpy(img)
            out = httpclient.InferRequestedOutput("scores", class_count=2)
            got = client.infer("colours", [feed], outputs=[out]).as_numpy("scores")
        finally:
            client.close()
        assert got is not None
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in got.reshape(-1)]
        print(f"infer('colours', image sky.jpg {list(img.shape)} UINT8, scores "
              f"class_count=2) -> {texts}")
    print("\nclassify_images finished OK")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
