"""Training recipes: typed parsing, defaults, and one-line errors for every kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from emaki.train.recipe import (
    RecipeError,
    UNetModelConfig,
    VAEModelConfig,
    load_recipe,
    parse_recipe,
)

VAE = """
kind = "vae"
output = "runs/vae"
[data]
path = "data/emoji"
resolution = 64
[model]
block_out_channels = [16, 32]
kl_weight = 1e-6
[train]
steps = 10
batch_size = 4
mixed_precision = "bf16"
"""


def test_parse_fills_types_and_defaults() -> None:
    r = parse_recipe(VAE)
    assert r.kind == "vae" and r.output == Path("runs/vae")
    assert isinstance(r.model, VAEModelConfig)
    assert r.model.block_out_channels == [16, 32] and r.model.kl_weight == 1e-6
    assert r.data.path == Path("data/emoji") and r.data.bucketing is True
    assert r.train.mixed_precision == "bf16" and r.train.grad_accum == 1
    assert r.optim.lr == 1e-4  # default
    assert r.source == VAE


def test_unet_recipe_model_table() -> None:
    text = VAE.replace('kind = "vae"', 'kind = "unet"').replace(
        "[model]\nblock_out_channels = [16, 32]\nkl_weight = 1e-6",
        '[model]\nvae = "runs/vae/model"\nprediction_type = "v_prediction"\nmin_snr_gamma = 5',
    )
    r = parse_recipe(text)
    assert isinstance(r.model, UNetModelConfig)
    assert r.model.prediction_type == "v_prediction" and r.model.min_snr_gamma == 5.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("resolution = 64", "resolution = 60"), "multiple of 8"),
        (("resolution = 64", "resolutoin = 64"), "unknown key data.resolutoin"),
        (("steps = 10", 'steps = "ten"'), "train.steps must be an integer"),
        (('mixed_precision = "bf16"', 'mixed_precision = "fp8"'), "choose one of 'no' | 'bf16'"),
        (('kind = "vae"', 'kind = "gan"'), "kind = 'gan'"),
        (("kl_weight = 1e-6", "kl_weigth = 1e-6"), "unknown key model.kl_weigth"),
        (('output = "runs/vae"', ""), "missing required key output"),
        (("[train]", "[trian]"), "unknown table or key 'trian'"),
        (("steps = 10", "steps = 0"), "train.steps must be positive"),
        (("block_out_channels = [16, 32]", "block_out_channels = 16"), "must be a list"),
        (("batch_size = 4", "batch_size = 4 4"), "not valid TOML"),
    ],
)
def test_mistakes_are_one_line_errors(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(RecipeError) as e:
        parse_recipe(VAE.replace(*edit))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.toml")


def test_shipped_recipes_parse() -> None:
    recipes = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.toml"))
    for path in recipes:
        load_recipe(path)
