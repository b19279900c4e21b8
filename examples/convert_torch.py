"""Convert a PyTorch model into a verified edge-sdk artifact.

    python examples/convert_torch.py [WORK_DIR]

Trains a tiny CNN for a few steps (stand-in for your model), saves it with
``torch.export.save`` (dynamic batch), writes a calibration file of real-looking
inputs, then converts. The CLI equivalent:

    edge-sdk convert cnn.pt2 -o cnn-artifact --calibration calib.npz

(A TorchScript file or ``package.module:factory`` with ``--input-shape
image=1x3x32x32`` work the same way.)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import edge_sdk
from converters import convert


class TinyCnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(image))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))


def main(work: Path) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (96, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 96)
    model = TinyCnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images)),
                                                 torch.from_numpy(labels))
        loss.backward()
        opt.step()
    model.eval()

    src = work / "cnn.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.from_numpy(images[:2]),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(src))
    calib = work / "calib.npz"
    np.savez(calib, image=images, labels=labels)

    result = convert(src, work / "cnn-artifact", calibration=calib, overwrite=True)
    print(f"chosen: {result.chosen} — {result.report['why']}")

    predictor = edge_sdk.load(result.artifact.path)
    x = images[:4]
    got = predictor.predict({"image": x})["output"]
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    print(f"max |artifact - torch| = {np.max(np.abs(got - want)):.2e}; "
          f"top-1 equal: {bool(np.all(got.argmax(1) == want.argmax(1)))}")
    print(f"artifact: {result.artifact.path}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
