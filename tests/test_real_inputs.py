"""Real inputs for the real models: signatures match and the float models behave sensibly."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks import inputs

pytestmark = pytest.mark.real

_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


def _check_signature(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = {item.name: item for item in session.get_inputs()}
    for feed in feeds:
        assert set(feed) == set(expected)
        for name, array in feed.items():
            assert array.dtype == _DTYPES[expected[name].type], name
            assert array.ndim == len(expected[name].shape), name
    shapes = {name: {feed[name].shape for feed in feeds} for name in expected}
    assert all(len(found) == 1 for found in shapes.values()), "samples must stack"


def test_ppocr_det_inputs_show_text(real_model):
    path = real_model("ppocr_det")
    feeds = inputs.ppocr_det_inputs(4)
    _check_signature(path, feeds)
    assert feeds[0]["x"].shape == (1, 3, 480, 640)
    assert feeds[0]["x"].min() >= -1.0 and feeds[0]["x"].max() <= 1.0
    outputs = inputs.run_model(path, feeds)
    page = next(iter(outputs[inputs.DET_IMAGES.index("page")].values()))
    assert 0.02 < (page > 0.3).mean() < 0.5  # the scanned page has lines of text
    assert inputs.task_agreement("ppocr_det", outputs, outputs) == 1.0


def test_ppocr_cls_inputs_have_both_directions(real_model):
    path = real_model("ppocr_cls")
    feeds = inputs.ppocr_cls_inputs(16)
    _check_signature(path, feeds)
    outputs = inputs.run_model(path, feeds)
    predicted = np.array([next(iter(out.values())).argmax() for out in outputs])
    labels = inputs.ppocr_cls_labels(16)
    assert set(predicted) == {0, 1}
    assert (predicted == labels).mean() >= 0.8
    assert inputs.task_agreement("ppocr_cls", outputs, outputs) == 1.0
    flipped = [[1 - out] for out in (next(iter(o.values())) for o in outputs)]
    assert inputs.task_agreement("ppocr_cls", outputs, flipped) == 0.0


@pytest.mark.parametrize("key", ["silero_vad", "silero_vad_sequence"])
def test_vad_inputs_separate_speech_from_silence(real_model, key):
    path = real_model(key)
    feeds = inputs.vad_inputs(key, 6 if key.endswith("sequence") else 96)
    _check_signature(path, feeds)
    assert all(np.abs(feed["input"]).max() <= 1.0 for feed in feeds)
    outputs = inputs.run_model(path, feeds)
    probs = np.concatenate([next(iter(out.values())).reshape(-1) for out in outputs])
    assert (probs > 0.5).mean() > 0.2 and (probs < 0.5).mean() > 0.1
    metrics = inputs.task_metrics(key, outputs, outputs)
    assert metrics == {"decision_agreement": 1.0, "mean_abs_diff": 0.0}


def test_encoder_inputs_and_metric():
    pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    from benchmarks.encoder import SENTENCES, encoder_model_path

    assert len(SENTENCES) >= 300 and len(set(SENTENCES)) == len(SENTENCES)
    path = encoder_model_path()
    feeds = inputs.encoder_inputs(4, offset=10)
    _check_signature(path, feeds)
    outputs = inputs.run_model(path, feeds)
    assert inputs.task_agreement("encoder", outputs, outputs) == pytest.approx(1.0)
    hidden_only = [{"last_hidden_state": out["last_hidden_state"]} for out in outputs]
    assert inputs.task_agreement("encoder", outputs, hidden_only, feeds) == pytest.approx(1.0)
    shuffled = outputs[1:] + outputs[:1]
    assert inputs.task_agreement("encoder", outputs, shuffled) < 0.6
