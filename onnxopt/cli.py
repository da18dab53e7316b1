"""The ``onnxopt`` command line: a thin layer over the Python API.

Exit codes: 0 success, 1 a check failed (or a pass broke equivalence under --verify),
2 unusable input or usage, 3 an internal error (a bug: rerun with --debug and report it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from onnxopt.errors import CalibrationDataError, OnnxoptError, RecipeError, VerificationError
from onnxopt.outputs import Output, check_location, write_outputs
from onnxopt.params import ParamText

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Optimize ONNX models (fuse, int8, prune, lowrank) and check them against a reference.",
    pretty_exceptions_enable=False,
)
# Wide when writing to a file or CI log, where rich would otherwise wrap tables at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 400)


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")


def parse_named_values(items: Iterable[str], what: str) -> dict[str, str]:
    """Parse ``name:value`` options (``--atol out0:1e-3``); the name may contain colons."""
    parsed = {}
    for item in items:
        match = re.match(r"^(.*):([^:]+)$", item)
        if not match or not match.group(1):
            raise CalibrationDataError(f"{what} {item!r}: expected NAME:VALUE")
        parsed[match.group(1)] = match.group(2)
    return parsed


def _json_writer(data: Callable[[], dict[str, Any]]) -> Callable[[Path], None]:
    """Return a writer of the JSON document ``data()`` (built when written, after the files before it)."""

    def write(path: Path) -> None:
        path.write_text(json.dumps(data(), indent=2, default=str))

    return write


def _parse_shapes(items: list[str]) -> dict[str, list[int]]:

    shapes = {}
    for name, text in parse_named_values(items, "--shape").items():
        try:
            shapes[name] = [int(d) for d in text.lower().split("x")]
        except ValueError:
            raise OnnxoptError(f"--shape {name}:{text}: expected dims like 1x3x224x224") from None
    return shapes


def _parse_int_ranges(items: list[str]) -> tuple[tuple[int, int] | None, dict[str, tuple[int, int]]]:
    default = None
    per_input: dict[str, tuple[int, int]] = {}
    for item in items:
        parts = item.rsplit(":", 2)
        try:
            if len(parts) == 2:
                default = (int(parts[0]), int(parts[1]))
            elif len(parts) == 3:
                per_input[parts[0]] = (int(parts[1]), int(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise OnnxoptError(f"--int-range {item!r}: expected LOW:HIGH or NAME:LOW:HIGH") from None
    return default, per_input


def _synthesis(shape: list[str], int_range: list[str], iterations: int, seed: int) -> dict[str, Any]:
    default, per_input = _parse_int_ranges(int_range)
    options: dict[str, Any] = {
        "shapes": _parse_shapes(shape),
        "int_ranges": per_input,
        "iterations": iterations,
        "seed": seed,
    }
    if default is not None:
        options["int_range"] = default
    return options


def _parse_overrides(params: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in params:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--param {item!r}: expected NAME=VALUE")
        overrides[key] = ParamText(text)  # parsed against each pass's declared type (onnxopt.params)
    return overrides


ShapeOpt = Annotated[list[str], typer.Option("--shape", help="Input shape for synthesized data, NAME:1x3x224x224.")]
IntRangeOpt = Annotated[
    list[str], typer.Option("--int-range", help="Integer input range LOW:HIGH or NAME:LOW:HIGH (inclusive).")
]


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="The ONNX model to optimize (never modified).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the optimized model.")],
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="Preset name or TOML recipe file.")] = "fuse",
    calib: Annotated[Path | None, typer.Option("--calib", help="Calibration data: .npz or folder of .npz.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check the model with the harness after every pass.")
    ] = False,
    param: Annotated[
        list[str], typer.Option("--param", help="Pass parameter NAME=VALUE for every pass having it.")
    ] = [],  # noqa: B006
    sparsity: Annotated[float | None, typer.Option(help="Target sparsity for pruning passes.")] = None,
    rank: Annotated[int | None, typer.Option(help="Rank for low-rank splitting.")] = None,
    energy: Annotated[float | None, typer.Option(help="Fraction of singular-value energy to keep.")] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Accuracy target of a lossy pass, e.g. 'cosine>=0.999'; '...@out1|out2' judges those outputs."
        ),
    ] = None,
    shape: ShapeOpt = [],  # noqa: B006
    int_range: IntRangeOpt = [],  # noqa: B006
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table, no progress bars.")] = False,
    require_applied: Annotated[
        bool,
        typer.Option("--require-applied", help="Exit 1 when a lossy pass was not applied (the model is written)."),
    ] = False,
) -> None:
    """Run a pipeline on MODEL and write the result to OUTPUT."""
    from onnxopt.data import load_dataset
    from onnxopt.external import Spill, has_lazy_tensors
    from onnxopt.harness import Verifier
    from onnxopt.model import load_model, save_model
    from onnxopt.pipeline import CheckerInstrument, Context, load_recipe
    from onnxopt.progress import NullProgress, RichProgress

    if output.resolve() == model.resolve():
        raise OnnxoptError(f"-o {output} is the input model; write the result to another file")
    check_location(output, "-o")
    if report is not None:
        check_location(report, "--report")
    loaded = load_model(model)
    loaded_graph = load_model(model, load_external_data=False)
    overrides = _parse_overrides(param)
    for key, value in (("sparsity", sparsity), ("rank", rank), ("energy", energy), ("target", target)):
        if value is not None:
            overrides[key] = value
    spec = load_recipe(pipeline)
    if overrides:
        spec = spec.with_overrides(overrides)
    verifier = Verifier(synthesize=_synthesis(shape, int_range, 2, 0)) if verify else None
    manager = spec.build(instruments=[CheckerInstrument()], verify=verifier)
    # New large tensors of a model kept in external data go to a scratch file beside the output
    # (or in the temporary folder when the output's folder does not exist yet).
    spill_folder = output.parent if output.parent.is_dir() else None
    with Spill(spill_folder) if has_lazy_tensors(loaded) else contextlib.nullcontext() as spill:
        ctx = Context(
            calibration=load_dataset(calib, loaded) if calib is not None else None,
            progress=NullProgress() if quiet else RichProgress(),
            spill=spill,
        )
        result = manager.run(loaded, ctx)
        written: dict[str, int] = {}

        def write_model(path: Path) -> None:
            saved = save_model(result.model, path)
            data_file = saved.with_name(saved.name + ".data")
            written["bytes"] = saved.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0)

        input_bytes = _file_bytes(model, loaded_graph)
        outputs = [Output(output, "-o", write_model)]
        if report is not None:
            outputs.append(
                Output(
                    report,
                    "--report",
                    _json_writer(
                        lambda: {
                            "status": result.to_dict()["status"],
                            "model": str(model),
                            "output": str(output),
                            "pipeline": spec.name,
                            "output_bytes": written["bytes"],
                            "input_bytes": input_bytes,
                            **result.to_dict(),
                        }
                    ),
                )
            )
        write_outputs(outputs)
        size = written["bytes"]
    if not quiet:
        from onnxopt.display import render_pipeline

        source_opset = next((o.version for o in loaded_graph.opset_import if o.domain in ("", "ai.onnx")), None)
        render_pipeline(out, result, output_bytes=size, source_opset=source_opset)
        for record in result.outcomes():
            line = f"{record.name}: {record.status}" + (f": {record.reason}" if record.reason else "")
            out.print(line, markup=False, highlight=False)
        out.print(f"wrote {output} ({size:,} bytes; input {input_bytes:,} bytes)", markup=False, highlight=False)
    if verifier is not None:
        if not quiet:
            out.print(
                f"verified {len(verifier.checked)} changed pass run(s) on {verifier.sample_count} sample(s): every "
                "output matched",
                markup=False,
            )
        for warning in verifier.warnings:
            err.print(f"onnxopt: warning: {warning}", highlight=False, soft_wrap=True, markup=False)
    if size > input_bytes:
        err.print(
            f"onnxopt: warning: {_growth(result, size, input_bytes)}", highlight=False, soft_wrap=True, markup=False
        )
    blocked = [r for r in result.outcomes() if r.status == "not applied"]
    if require_applied and blocked:
        first = blocked[0]
        err.print(
            f"onnxopt: {first.name} was not applied ({first.reason}); --require-applied makes this exit 1 "
            f"(the model was written to {output})",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        raise typer.Exit(1)


def _file_bytes(path: Path, graph: Any) -> int:
    """Return the bytes of a model file plus the external data files it references."""
    import onnx

    from onnxopt.graph import iter_tensors

    files = {
        entry.value
        for tensor in iter_tensors(graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())


def _growth(result: Any, size: int, input_bytes: int) -> str:
    """Say that the output is larger than the input, and which pass added the most bytes."""
    message = f"the output ({size:,} bytes) is larger than the input ({input_bytes:,} bytes)"
    grown = [r for r in result.records if r.changed and r.after.bytes > r.before.bytes]
    if grown:
        worst = max(grown, key=lambda r: r.after.bytes - r.before.bytes)
        message += f": pass {worst.name} added the most ({worst.after.bytes - worst.before.bytes:,} bytes)"
        if not worst.exact or worst.name.startswith("fold"):
            message += (
                ", e.g. weights folded into a copy while the original stays read elsewhere"
                if worst.exact
                else " (see its notes)"
            )
    else:
        message += " (normalization or serialization, not a pass: see the notes)"
    return message


def _declared_metrics(texts: list[str], path: Path | None) -> list[Any]:
    """Return the metrics of ``--metric`` options and a ``--metrics`` TOML file."""
    from onnxopt.harness import load_metrics, parse_metric

    return [parse_metric(t) for t in texts] + (load_metrics(path) if path is not None else [])


def _graph_of(path: Path) -> Any:
    """Load a model's graph without reading external data (whose references are checked)."""
    from onnxopt.model import load_model, verify_external_data

    model = load_model(path, load_external_data=False)
    verify_external_data(model, path)
    return model


@app.command()
def check(
    models: Annotated[list[Path], typer.Argument(help="REFERENCE CANDIDATE, or CANDIDATE with --load-outputs.")],
    data: Annotated[Path | None, typer.Option("--data", help="Inputs: .npz or folder of .npz.")] = None,
    profile: Annotated[str, typer.Option(help="Tolerance profile: exact, fp16 or int8.")] = "exact",
    atol: Annotated[list[str], typer.Option("--atol", help="Per-output absolute tolerance NAME:VALUE.")] = [],  # noqa: B006
    rtol: Annotated[list[str], typer.Option("--rtol", help="Per-output relative tolerance NAME:VALUE.")] = [],  # noqa: B006
    tolerances: Annotated[Path | None, typer.Option(help="TOML file of per-output tolerances.")] = None,
    shape: ShapeOpt = [],  # noqa: B006
    int_range: IntRangeOpt = [],  # noqa: B006
    iterations: Annotated[int, typer.Option(help="Synthesized samples when no --data is given.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of synthesized data.")] = 0,
    levels: Annotated[str, typer.Option(help="onnxruntime levels to run the candidate at.")] = "disabled,default",
    save_outputs: Annotated[Path | None, typer.Option(help="Save inputs and reference outputs (golden file).")] = None,
    load_outputs: Annotated[Path | None, typer.Option(help="Use a golden file instead of a reference model.")] = None,
    layers: Annotated[
        bool, typer.Option("--layers", help="Compare intermediate tensors; show where error grows.")
    ] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write a JUnit XML report here.")] = None,
    metric: Annotated[
        list[str],
        typer.Option("--metric", help="Task metric OUTPUT[SLICE]:NAME[@ARG]>=FLOOR, e.g. 'output0[:, 4:]:top1>=0.99'."),
    ] = [],  # noqa: B006
    metrics: Annotated[Path | None, typer.Option("--metrics", help="TOML file of [[metric]] tables.")] = None,
) -> None:
    """Check that CANDIDATE still computes what REFERENCE computes (the pre-deployment gate)."""
    from onnxopt.data import load_dataset
    from onnxopt.harness import check as run_check
    from onnxopt.harness import load_golden, load_tolerances, save_golden
    from onnxopt.runtime import run_model

    for option, location in (("--save-outputs", save_outputs), ("--report", report), ("--junit", junit)):
        if location is not None:
            check_location(location, option)
    if len(models) == 2:
        ref_path, cand_path = models
    elif len(models) == 1 and load_outputs is not None:
        ref_path, cand_path = None, models[0]
    else:
        raise OnnxoptError("pass REFERENCE CANDIDATE, or CANDIDATE with --load-outputs GOLDEN.npz")
    # Graphs only: onnxruntime reads the files (and external data) itself.
    ref_model = _graph_of(ref_path) if ref_path is not None else None
    candidate = _graph_of(cand_path)
    overrides: dict[str, dict[str, float]] = load_tolerances(tolerances) if tolerances else {}
    for flag, items in (("atol", atol), ("rtol", rtol)):
        for name, value in parse_named_values(items, f"--{flag}").items():
            try:
                overrides.setdefault(name, {})[flag] = float(value)
            except ValueError:
                raise OnnxoptError(f"--{flag} {name}:{value}: the value must be a number") from None
    golden_outputs = None
    dataset = None
    outputs: list[Output] = []
    if load_outputs is not None:
        dataset, golden_outputs = load_golden(load_outputs)
    if data is not None:
        dataset = load_dataset(data, ref_model or candidate)
    synth = _synthesis(shape, int_range, iterations, seed)
    if save_outputs is not None:
        if ref_model is None:
            raise OnnxoptError("--save-outputs needs the reference model")
        if dataset is None:
            from onnxopt.harness import synthesize_inputs

            dataset = synthesize_inputs(ref_model, **synth)
        golden_outputs = run_model(str(ref_path), dataset, label="reference")
        golden = (dataset, golden_outputs)
        outputs.append(Output(save_outputs, "--save-outputs", lambda path: save_golden(path, *golden)))
    result = run_check(
        ref_path,
        cand_path,
        dataset,
        profile=profile,
        overrides=overrides,
        levels=[lv.strip() for lv in levels.split(",") if lv.strip()],
        reference_outputs=golden_outputs,
        synthesize=synth,
        layers=layers,
        metrics=_declared_metrics(metric, metrics),
    )
    result.candidate = str(cand_path)
    result.reference = str(models[0]) if ref_model is not None else str(load_outputs)
    from onnxopt.display import render_check

    if report is not None:
        outputs.append(Output(report, "--report", _json_writer(result.to_dict)))
    if junit is not None:
        junit_text = result.to_junit()
        outputs.append(Output(junit, "--junit", lambda path: path.write_text(junit_text)))
    write_outputs(outputs)
    render_check(out, result)
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="The ONNX model to describe.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Refuse (exit 2) what optimize and check would refuse.")
    ] = False,
) -> None:
    """Describe MODEL: opsets, inputs/outputs, ops, parameters and where its weights live."""
    from onnxopt.describe import describe_model
    from onnxopt.errors import ExternalDataError

    description = describe_model(model)
    if description.external_outside:
        where = ", ".join(repr(f) for f in description.external_outside)
        message = (
            f"{model}: external data {where} lies outside the model's folder; optimize and check refuse it "
            "(move the data file next to the model)"
        )
        if strict:
            raise ExternalDataError(message)
        err.print(f"onnxopt: warning: {message}", highlight=False, soft_wrap=True, markup=False)
    if as_json:
        out.print_json(data=description.to_dict())
        return
    from onnxopt.display import render_description

    render_description(out, description)


@app.command()
def passes() -> None:
    """List the registered passes and presets with their parameters."""
    from onnxopt.display import render_passes
    from onnxopt.pipeline import _PRESETS, available_passes, pass_parameters

    table = {
        name: (cls.exact, pass_parameters(cls), (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "")
        for name, cls in available_passes().items()
    }
    presets = {name: (desc, build().stages) for name, (desc, build) in sorted(_PRESETS.items())}
    render_passes(out, table, presets)


@app.command()
def tune(
    model: Annotated[Path, typer.Argument(help="The ONNX model to tune (never modified).")],
    calib: Annotated[
        Path, typer.Option("--calib", help="Real inputs: .npz or folder of .npz (split to calibrate and judge).")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the chosen model.")],
    target: Annotated[
        str | None,
        typer.Option(help="Accuracy target, e.g. 'cosine>=0.995' or 'top1>=0.99@probs' (default: int8 floors)."),
    ] = None,
    objective: Annotated[str, typer.Option(help="What to minimize: latency, size or balanced.")] = "latency",
    budget_minutes: Annotated[float, typer.Option("--budget-minutes", help="Time budget of the whole search.")] = 15.0,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads for the latency figures.")] = 1,
    jobs: Annotated[int, typer.Option("--jobs", help="Build and judge candidates in N worker processes.")] = 1,
    ray: Annotated[
        str | None, typer.Option("--ray", help="Run candidates on this Ray cluster (needs the ray extra).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data split and the passes.")] = 0,
    only: Annotated[
        str | None, typer.Option("--only", help="Try only these candidates (comma-separated names).")
    ] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report (and the chart) here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table, no progress.")] = False,
) -> None:
    """Try recipes on MODEL; write the fastest (or smallest) that meets the target, with its recipe."""
    from onnxopt.progress import NullProgress, RichProgress
    from onnxopt.tune import tune as run_tune
    from onnxopt.tune_report import replay_files, report_dict, table_lines, write_chart

    if output.resolve() == model.resolve():
        raise OnnxoptError(f"-o {output} is the input model; write the result to another file")
    result = run_tune(
        model,
        calib,
        output=output,
        target=target,
        objective=objective,
        budget_minutes=budget_minutes,
        threads=threads,
        jobs=jobs,
        ray=ray,
        seed=seed,
        progress=NullProgress() if quiet else RichProgress(),
        only=[name.strip() for name in only.split(",") if name.strip()] if only else None,
    )
    replay = replay_files(result, output)
    chart = write_chart(result, (report or output).with_suffix(".pareto.png"))
    if report is not None:
        report_data = report_dict(result, model=str(model), output=str(output))
        write_outputs([Output(report, "--report", _json_writer(lambda: report_data))])
    if not quiet:
        for line in table_lines(result):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        out.print(f"wrote {output}" + (f", {replay[0]} and {replay[1]}" if replay else ""), highlight=False)
        if chart is not None:
            out.print(f"chart: {chart}", highlight=False)
    if result.interrupted:
        err.print("onnxopt: interrupted; kept the best candidate measured so far", highlight=False)
        raise typer.Exit(130)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (errors become one line on stderr)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:  # accepted anywhere on the line, not only before the command
        args = ["--debug", *[a for a in args if a != "--debug"]]
    try:
        code = app(args=args, prog_name="onnxopt", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into a returned 130; no command of ours returns it
            err.print("onnxopt: interrupted; nothing was written", highlight=False, markup=False)
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("onnxopt: interrupted; nothing was written", highlight=False, markup=False)
        return 130
    except typer.Abort:
        err.print("onnxopt: aborted")
        return 2
    except typer.TyperException as exc:  # usage errors: unknown option, missing argument, bad value
        _traceback(debug)
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err.print(f"onnxopt: error: {exc.format_message()}", highlight=False, markup=False)
        return 2
    except VerificationError as exc:
        _traceback(debug)
        err.print(f"onnxopt: verification failed: {exc} (nothing was written)", highlight=False, markup=False)
        return 1
    except OnnxoptError as exc:
        _traceback(debug)
        err.print(f"onnxopt: error: {exc}", highlight=False, soft_wrap=True, markup=False)
        return exc.exit_code
    except Exception as exc:
        _traceback(debug)
        err.print(
            f"onnxopt: internal error: {type(exc).__name__}: {exc}. Rerun with --debug for the traceback "
            "and report it.",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        return 3
    return code if isinstance(code, int) else 0


def _traceback(debug: bool) -> None:
    """Under ``--debug``, print the traceback of the exception being handled (the exit code stays the same)."""
    if debug:
        traceback.print_exc(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
