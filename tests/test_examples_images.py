"""The image examples (issue 27, item 6) run as a user would run them: a real conversion
with --preprocess/--postprocess/--labels, a real signed release, broker and agent, and
answers to image files that are the ones the synthetic photos call for."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, work: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(work)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


def _manifest(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((path / "manifest.json").read_text())
    return data


def test_example_classifier_answers_each_photo_with_its_colour_on_the_agent(
        tmp_path: Path) -> None:
    out = _run("classify_images.py", tmp_path)
    assert "classify_images finished OK" in out
    manifest = _manifest(tmp_path / "colours-art")
    assert manifest["labels"] == ["red", "green", "blue", "yellow"]
    assert "pipeline (raw images in, vs the reference pipeline on 16 samples" in out
    assert "top-1 labels agree 100.00%" in out
    # The command line and the agent both answer the colour the photo was drawn in.
    for line, colour in (("apple.jpg", "red"), ("leaf.png", "green"), ("sky.jpg", "blue")):
        predicted = out.split(f"--image {tmp_path / line}\n", 1)[1].splitlines()[0]
        assert re.fullmatch(rf"0\.\d{{4}}  {colour} \(class \d\)", predicted), predicted
        assert re.search(rf"^POST {line} -> {colour} 0\.\d{{3}}, ", out, re.M), out
    assert "deployment 1 committed on all 1 device(s)" in out
    triton = re.search(r"class_count=2\) -> \['([\d.]+):2:blue', '[\d.]+:\d:\w+'\]", out)
    assert triton and float(triton[1]) > 0.5, out[-1500:]


def test_example_detector_answers_boxes_of_the_drawn_shapes_in_photo_pixels(
        tmp_path: Path) -> None:
    out = _run("detect_images.py", tmp_path)
    assert "detect_images finished OK" in out
    manifest = _manifest(tmp_path / "shapes-art")
    assert manifest["labels"] == ["red", "green", "blue"]
    assert "detections matched by IoU and class 100.00%" in out
    agent = out.split("POST image files to the agent", 1)[1]
    for photo, labels in (("street.jpg", ["blue", "red"]), ("park.png", ["red", "green"])):
        answer = agent.split(f"POST {photo} -> ", 1)[1].split("\nPOST ", 1)[0]
        answer = answer.split("\n===", 1)[0]
        boxes = re.findall(r"^  (\w+) +([\d.]+) at \(.*\): IoU ([\d.]+) with the (\w+) shape",
                           answer, re.M)
        assert [b[0] for b in boxes] == labels, answer
        for label, score, iou, drawn in boxes:
            # The letterbox is undone: each box lies on its shape in the photo's pixels.
            assert label == drawn and float(iou) >= 0.9 and 0.25 < float(score) <= 1
    triton = agent.split("infer('shapes', image park.png [1, 240, 320, 3] UINT8) ->", 1)[1]
    assert re.findall(r"class_ids (\d) \((\w+)\)", triton) == [("0", "red"), ("1", "green")]
