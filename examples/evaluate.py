"""Compare digit classifiers: top-1 accuracy, file size and onnxruntime CPU latency.

Usage: ``python examples/evaluate.py MODEL [MODEL ...]``, e.g. the float model from
``make_digits.py`` next to its optimized or quantized variants. Accuracy is measured on
``digits_eval.npz`` / ``digits_eval_labels.npy`` (next to this script); latency is the
median time of one batch-1 inference, with the models' runs interleaved so that they see
the same machine load.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5, help="passes over the eval set when timing (default 5)")
    args = parser.parse_args(argv)

    data = np.load(HERE / "digits_eval.npz")
    (name,) = data.files
    images = data[name]
    labels = np.load(HERE / "digits_eval_labels.npy")
    sessions = [_session(path) for path in args.models]

    correct = np.zeros(len(sessions))
    for image, label in zip(images, labels, strict=True):
        for index, session in enumerate(sessions):
            feed = {session.get_inputs()[0].name: image}
            correct[index] += int(session.run(None, feed)[0].argmax() == label)

    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(args.rounds):
        for image in images:
            for index, session in enumerate(sessions):
                feed = {session.get_inputs()[0].name: image}
                start = time.perf_counter()
                session.run(None, feed)
                times[index].append(time.perf_counter() - start)

    width = max(len(str(path)) for path in args.models)
    print(f"{'model':<{width}}  {'top-1':>7}  {'size kB':>9}  {'median us':>9}")
    for index, path in enumerate(args.models):
        accuracy = correct[index] / len(labels)
        size = path.stat().st_size / 1e3
        latency = float(np.median(times[index])) * 1e6
        print(f"{path!s:<{width}}  {accuracy:>7.4f}  {size:>9.1f}  {latency:>9.1f}")


if __name__ == "__main__":
    main()
