"""Train a small digit classifier and export it as a real ONNX model for the examples.

The data are scikit-learn's bundled handwritten digits (``load_digits``: 1797 images of
8x8 pixels, no download), upsampled to 16x16. The network has what fusion and
quantization work on: Conv + BatchNormalization + ReLU blocks, pooling, a global average
pool and a final Linear (Gemm). It is exported with the TorchScript exporter at opset 13
with ``TrainingMode.PRESERVE`` from eval mode, so BatchNormalization stays a node instead
of being folded into the convolutions by the exporter.

Writes, next to this script:

- ``digits.onnx``: the model, input ``image`` [batch, 1, 16, 16] float32, output
  ``logits`` [batch, 10];
- ``digits_calib.npz``: 64 training images under the key ``image``, shape (64, 1, 1, 16, 16)
  (one batch-1 sample per entry of the first axis);
- ``digits_eval.npz`` / ``digits_eval_labels.npy``: the held-out test images in the same
  layout and their labels.

Usage: ``python examples/make_digits.py`` (needs torch, scikit-learn, numpy and onnx).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
SIDE = 16
CALIBRATION_SAMPLES = 64
INPUT_NAME = "image"


class DigitNet(nn.Module):
    """A small CNN for 16x16 grey digits: three Conv+BN+ReLU blocks, pooling, Linear."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 16),
            *block(16, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the class logits of a batch of images [N, 1, 16, 16]."""
        return self.classifier(self.features(x))


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return normalized train/test images [N, 1, 16, 16] float32 and int64 labels."""
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    # Nearest-neighbour upsampling keeps the data exactly reproducible without torch.
    images = images.repeat(SIDE // 8, axis=1).repeat(SIDE // 8, axis=2)
    images = (images - 0.5) / 0.5
    x_train, x_test, y_train, y_test = train_test_split(
        images[:, None],
        digits.target.astype(np.int64),
        test_size=0.25,
        random_state=SEED,
        stratify=digits.target,
    )
    return x_train, x_test, y_train, y_test


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 15) -> None:
    """Train ``model`` in place with Adam and a one-cycle schedule."""
    generator = torch.Generator().manual_seed(SEED)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    batch = 64
    steps = epochs * ((len(x) + batch - 1) // batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[index]), targets[index])
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    x_train, x_test, y_train, y_test = load_data()
    model = DigitNet()
    start = time.perf_counter()
    train(model, x_train, y_train)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    print(f"trained in {seconds:.1f} s, torch test accuracy {accuracy:.4f} on {len(y_test)}")

    path = HERE / "digits.onnx"
    torch.onnx.export(
        model,
        (torch.from_numpy(x_test[:1]),),
        str(path),
        dynamo=False,
        opset_version=13,
        input_names=[INPUT_NAME],
        output_names=["logits"],
        dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = sorted({node.op_type for node in proto.graph.node})
    print(f"wrote {path.name}: {path.stat().st_size / 1e3:.1f} kB, ops {ops}")

    rng = np.random.default_rng(SEED)
    calibration = x_train[rng.choice(len(x_train), CALIBRATION_SAMPLES, replace=False)]
    np.savez(HERE / "digits_calib.npz", allow_pickle=False, **{INPUT_NAME: calibration[:, None]})
    np.savez(HERE / "digits_eval.npz", allow_pickle=False, **{INPUT_NAME: x_test[:, None]})
    np.save(HERE / "digits_eval_labels.npy", y_test)
    print(
        f"wrote digits_calib.npz {calibration[:, None].shape}, "
        f"digits_eval.npz {x_test[:, None].shape}, digits_eval_labels.npy"
    )


if __name__ == "__main__":
    main()
