"""onnxopt's onnxruntime sessions: quiet themselves, and leave the process's onnxruntime logging alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
from onnx import helper

from onnxopt.runtime import Session
from tests.builders import make_model, vi

# Sets onnxruntime's process-wide log level to verbose, optionally imports onnxopt (and
# runs one of its quiet sessions), then opens a session of its own, which must still log.
_PROGRAM = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    ort.set_default_logger_severity(0)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if sys.argv[1] == "import":
        import onnxopt.passes  # noqa: F401
        from onnxopt.runtime import Session

        with Session(model) as session:
            session.run({"x": np.ones(2, np.float32)})
        print("ONNXOPT SESSION DONE", file=sys.stderr, flush=True)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
""")


def _stderr_after(mode: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stderr.splitlines()


def test_importing_onnxopt_leaves_the_default_logger_severity_as_it_was():
    def traces(lines: list[str]) -> int:
        return sum("TraceSessionOptions" in line for line in lines)

    assert traces(_stderr_after("plain")) == 1  # verbose onnxruntime logging traces a session's options
    lines = _stderr_after("import")
    done = lines.index("ONNXOPT SESSION DONE")
    assert traces(lines[:done]) == 0  # onnxopt's own session is quiet
    assert traces(lines[done + 1 :]) == 1  # the program's own session still logs verbosely


def test_session_runs_a_model():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    with Session(model) as session:
        out = session.run({"x": np.array([-1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(out["y"], [0.0, 2.0])
