"""X/Y/Z plot and prompt matrix: value syntax, axes, grid layout, seeds, end to end."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from emaki.errors import InvalidRequestError
from emaki.plots.axes import parse_axis, parse_numbers, split_values
from emaki.plots.matrix import matrix_prompts, run_prompt_matrix
from emaki.plots.xyz import run_xyz
from emaki.request import GenerationRequest, HiresFix


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("1-5", int, [1, 2, 3, 4, 5]),
        ("1-5 (+2)", int, [1, 3, 5]),
        ("10-5 (-3)", int, [10, 7]),
        ("1-10 [5]", int, [1, 3, 6, 8, 10]),
        ("5, 1-3, 9", int, [5, 1, 2, 3, 9]),
        ("-3--1", int, [-3, -2, -1]),
        ("1-3 (+0.5)", float, [1.0, 1.5, 2.0, 2.5, 3.0]),
        ("0.0-1.0 [6]", float, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        ("7.5, 3", float, [7.5, 3.0]),
    ],
)
def test_a1111_value_syntax(text, kind, expected) -> None:
    assert parse_numbers(text, kind) == pytest.approx(expected)


def test_csv_quoting_keeps_commas_inside_values() -> None:
    assert split_values('"a, b", c , ,d') == ["a, b", "c", "d"]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("Steps: 1-5 (-1)", "never gets from 1 to 5"),
        ("Steps: ten", "cannot read"),
        ("Sampler: Euler a, Nope", "unknown sampler"),
        ("Colour: red", "TYPE one of"),
        ("Steps 10", "TYPE one of"),
        ("CFG Scale: ", "no values"),
    ],
)
def test_bad_axes_are_clear_errors(spec, needle) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        parse_axis(spec)


def test_axes_apply_to_requests() -> None:
    base = GenerationRequest("a red cat", seed=1)
    assert (
        parse_axis("Prompt S/R: red, blue").type.apply(base, ("red", "blue")).prompt == "a blue cat"
    )
    order = parse_axis("Prompt order: red, cat")
    assert [order.type.apply(base, v).prompt for v in order.values] == ["a red cat", "a cat red"]
    with pytest.raises(InvalidRequestError, match="not in the prompt"):
        parse_axis("Prompt S/R: green, blue").type.apply(base, ("green", "blue"))
    hires = parse_axis("Hires steps: 4, 8")
    with pytest.raises(InvalidRequestError, match="hires fix on"):
        hires.type.apply(base, 4)
    with_hr = hires.type.apply(GenerationRequest("x", hires=HiresFix()), 8)
    assert with_hr.hires.steps == 8


@dataclass
class _Result:
    images: list
    infotexts: list
    seeds: list


def _fake_generate(calls: list):
    """Solid images whose colour encodes steps (red) and cfg (green): layout is checkable."""

    def generate(request: GenerationRequest, model):
        calls.append((request, model))
        colour = (request.steps * 10, int(request.cfg_scale * 10), 0)
        return _Result(
            [Image.new("RGB", (32, 32), colour)], [f"info {request.steps}"], [request.seed]
        )

    return generate


def test_grid_layout_x_columns_y_rows_and_labels() -> None:
    calls: list = []
    result = run_xyz(
        _fake_generate(calls), GenerationRequest("x"), parse_axis("Steps: 1-3"),
        parse_axis("CFG Scale: 5, 10"),
    )  # fmt: skip
    grid = np.asarray(result.sheet)
    assert len(calls) == 6 and len({r.seed for r, _ in calls}) == 1 and calls[0][0].seed != -1
    h, w = grid.shape[:2]
    left, top = w - 3 * 32, h - 2 * 32
    assert left > 0 and top > 0  # label margins
    for yi, cfg in enumerate((5, 10)):
        for xi, steps in enumerate((1, 2, 3)):
            px = grid[top + yi * 32 + 16, left + xi * 32 + 16]
            assert tuple(px) == (steps * 10, cfg * 10, 0)
    assert (grid[: top - 2, left:] < 128).any(), "column labels drawn"
    assert (grid[top:, : left - 2] < 128).any(), "row labels drawn"
    assert result.infotext == "info 1"


def test_z_axis_makes_one_grid_per_value_and_model_axis_runs_outermost() -> None:
    calls: list = []
    result = run_xyz(
        _fake_generate(calls), GenerationRequest("x", seed=4), parse_axis("Steps: 1, 2"),
        None, parse_axis("Checkpoint name: a.safetensors, b.safetensors"),
    )  # fmt: skip
    assert len(result.grids) == 2 and result.sheet.width > 2 * result.grids[0].width - 1
    assert [m for _, m in calls] == ["a.safetensors"] * 2 + ["b.safetensors"] * 2
    assert all(r.seed == 4 for r, _ in calls)


def test_prompt_matrix_combinations_and_grid() -> None:
    prompts, flags = matrix_prompts("a cat|red|hat")
    assert prompts == ["a cat", "a cat, red", "a cat, hat", "a cat, red, hat"]
    assert flags == [(False, False), (True, False), (False, True), (True, True)]
    calls: list = []
    result = run_prompt_matrix(_fake_generate(calls), GenerationRequest("a cat|red|hat"))
    assert [r.prompt for r, _ in calls] == prompts and len({r.seed for r, _ in calls}) == 1
    assert result.grid.width > 64 and result.grid.height > 64
    with pytest.raises(InvalidRequestError, match="at least one"):
        matrix_prompts("no options")


def test_plot_and_matrix_on_a_tiny_model(tiny_sd1_pipe, tmp_path, capsys) -> None:
    from emaki.cli import main
    from emaki.imageio import read_infotext
    from emaki.models.saving import save_diffusers

    calls = []

    def generate(request, model):
        calls.append(request)
        return tiny_sd1_pipe.generate(request)

    result = run_xyz(
        generate, GenerationRequest("a red apple", steps=2, seed=3), parse_axis("Steps: 1, 2"),
        parse_axis("Sampler: Euler, Euler a"),
    )  # fmt: skip
    assert len(result.cells) == 4 and result.sheet.width > 2 * 64
    result.sheet.save(tmp_path / "grid.png")
    model = tmp_path / "model"
    save_diffusers(tiny_sd1_pipe.bundle, model)
    out = tmp_path / "out"
    code = main(["plot", "a cat", "--model", str(model), "--x", "CFG Scale: 3, 7",
                 "--steps", "2", "--seed", "1", "--out", str(out)])  # fmt: skip
    assert code == 0
    grid = capsys.readouterr().out.strip().splitlines()[-1]
    assert "CFG scale: 3" in read_infotext(grid).to_text()
    assert (
        main(["matrix", "a cat|red", "--model", str(model), "--steps", "2", "--out", str(out)]) == 0
    )
    assert main(["plot", "x", "--model", str(model), "--x", "Steps: 0-"]) == 2
