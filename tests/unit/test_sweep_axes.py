"""Sweep command-line parsing: which overrides are axes, and how values and ranges are read."""

from __future__ import annotations

import pytest

from rlhf.errors import RlhfError
from rlhf.sweep import Axis, grid, parse_axes, split_top_level


def test_commas_inside_brackets_and_quotes_do_not_split():
    assert split_top_level("a,[b,c],{d: 1, e: 2},'f,g'") == ["a", "[b,c]", "{d: 1, e: 2}", "'f,g'"]
    assert split_top_level("1e-4") == ["1e-4"]


def test_lists_are_axes_single_values_are_shared_and_ranges_are_typed():
    fixed, axes = parse_axes(["lora.r=8,16", "train.max_steps=6", "data=[a:v1,b:v1]",
                              "train.learning_rate=log:1e-5..1e-3", "train.batch_size=4..16",
                              "lora.target_modules=[q_proj],[q_proj,v_proj]"])

    assert fixed == ["train.max_steps=6", "data=[a:v1,b:v1]"]
    assert axes == [
        Axis("lora.r", values=("8", "16")),
        Axis("train.learning_rate", low=1e-5, high=1e-3, log=True),
        Axis("train.batch_size", low=4, high=16, integer=True),
        Axis("lora.target_modules", values=("[q_proj]", "[q_proj,v_proj]")),
    ]


def test_grid_is_the_product_in_the_order_given():
    _, axes = parse_axes(["lora.r=8,16", "train.learning_rate=1e-4,5e-5"])

    assert grid(axes) == [
        {"lora.r": "8", "train.learning_rate": "1e-4"}, {"lora.r": "8", "train.learning_rate": "5e-5"},
        {"lora.r": "16", "train.learning_rate": "1e-4"}, {"lora.r": "16", "train.learning_rate": "5e-5"}]


@pytest.mark.parametrize("overrides, expected", [
    (["lora.r"], "is not key=value"),
    (["lora.r=8,8"], "lists an empty or repeated value"),
    (["lora.r=8,"], "lists an empty or repeated value"),
    (["train.learning_rate=1e-2..1e-4"], "the low end must be below the high end"),
    (["train.learning_rate=a..b"], "'a' is not a number"),
])
def test_bad_axes_are_one_line_errors(overrides, expected):
    with pytest.raises(RlhfError) as info:
        parse_axes(overrides)

    assert expected in str(info.value) and "\n" not in str(info.value)
