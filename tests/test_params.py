"""Typed pass parameters (#17): --param text is parsed against each pass's declared type."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxopt.cli import main
from onnxopt.errors import RecipeError
from onnxopt.params import ParamText, parse_bool
from onnxopt.pipeline import load_recipe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _int8_pass(**overrides):
    spec = load_recipe("int8").with_overrides({k: ParamText(v) for k, v in overrides.items()})
    return next(p for p in spec.build().passes if p.name == "quantize_int8")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("False", False), ("false", False), ("NO", False), ("0", False), ("true", True), ("Yes", True), ("1", True)],
)
def test_booleans_are_parsed_in_any_spelling(text, expected):
    assert _int8_pass(check_latency=text).check_latency is expected


def test_numbers_lists_and_none_are_typed():
    quantizer = _int8_pass(holdout="0.3", max_fallback="none", op_types="Conv,MatMul", percentile="99")
    assert quantizer.holdout == 0.3
    assert quantizer.max_fallback is None
    assert list(quantizer.op_types) == ["Conv", "MatMul"]
    assert quantizer.percentile == 99.0 and isinstance(quantizer.percentile, float)
    assert _int8_pass(max_fallback="3").max_fallback == 3


@pytest.mark.parametrize(
    ("name", "text", "accepted"),
    [
        ("per_channel", "maybe", "true/false"),
        ("holdout", "abc", "a number"),
        ("max_fallback", "2.5", "an integer or none"),
        ("check_latency", "", "true/false"),
    ],
)
def test_a_wrong_value_names_parameter_value_and_what_is_accepted(name, text, accepted):
    with pytest.raises(RecipeError) as caught:
        _int8_pass(**{name: text})
    message = str(caught.value)
    assert f"{name}={text}" in message and accepted in message


def test_recipe_values_are_checked_against_the_same_types(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "quantize_int8"\nper_channel = "maybe"\n')
    with pytest.raises(RecipeError, match="per_channel"):
        load_recipe(recipe)
    recipe.write_text('[[pass]]\nname = "quantize_int8"\nholdout = 0\n')
    assert load_recipe(recipe).stages[0].passes[0][1]["holdout"] == 0


def test_parse_bool_refuses_other_words():
    assert parse_bool("maybe") is None
    assert parse_bool(" off ") is False


def test_cli_wrong_param_is_one_line_exit_2(tmp_path, capsys):
    output = tmp_path / "o.onnx"
    code = main(["optimize", str(EXAMPLES / "digits.onnx"), "-o", str(output), "-p", "int8", "--param", "holdout=abc"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "onnxopt: error: --param holdout=abc: pass 'quantize_int8' accepts a number for holdout"
    ]
    assert not output.exists()
