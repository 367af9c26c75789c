"""The evaluator (identity classifier), the Fréchet distance, and emaki eval end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import linalg

from emaki.cli import main
from emaki.data.manifest import Record, read_manifest
from emaki.eval.evaluator import Evaluator, frechet_distance, identity_classes
from emaki.eval.run import Setting, evaluate, identity_prompts, markdown_table
from emaki.models.saving import save_diffusers
from emaki.models.tiny import make_tiny_bundle
from emaki.train.loop import train
from emaki.train.recipe import parse_recipe

SHAPES = ["circle", "square", "triangle", "bar"]
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 220)}
STYLES = ["flat style", "outline style", "small style", "offset style"]


def _draw(shape: str, colour: tuple[int, int, int], style: str, size: int = 32) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    m = 10 if style == "small style" else 4
    box = [m, m, size - m, size - m]
    if style == "offset style":
        box = [b + 3 for b in box]
    kw = {"outline": colour, "width": 3} if style == "outline style" else {"fill": colour}
    if shape == "circle":
        d.ellipse(box, **kw)
    elif shape == "square":
        d.rectangle(box, **kw)
    elif shape == "triangle":
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], **kw)
    else:
        d.rectangle([box[0], size // 2 - 3, box[2], size // 2 + 3], **kw)
    return im


@pytest.fixture(scope="module")
def styled_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 identities (colour x shape) in 4 styles, as a dataset folder with names and styles."""
    root = tmp_path_factory.mktemp("styled")
    (root / "images").mkdir()
    lines = []
    for style in STYLES:
        for cname, colour in COLOURS.items():
            for shape in SHAPES:
                name = f"{cname}-{shape}"
                rel = f"images/{style.split()[0]}-{name}.png"
                _draw(shape, colour, style).save(root / rel)
                sha = hashlib.sha256((root / rel).read_bytes()).hexdigest()
                rec = Record(
                    rel,
                    f"{cname} {shape}, {style}",
                    "test",
                    "CC0-1.0",
                    "",
                    sha,
                    32,
                    32,
                    name,
                    style,
                )
                lines.append(rec.to_json())
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def evaluator_dir(styled_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluator")
    recipe = f"""
kind = "classifier"
output = "{out}"
[data]
path = "{styled_dataset}"
resolution = 16
bucketing = false
random_crop = false
[model]
image_channels = [16, 32]
feature_dim = 32
holdout_style = "offset style"
min_styles = 3
[train]
steps = 120
batch_size = 12
[optim]
lr = 3e-3
[checkpoint]
every = 1000
[log]
every = 20
sample_every = 0
"""
    res = train(parse_recipe(recipe), progress=False)
    return res.model_dir


def test_frechet_distance_matches_the_closed_form_and_scipy() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal([0, 0, 0], [1, 2, 0.5], size=(20000, 3))
    b = rng.normal([1, 0, 2], [1, 1, 0.5], size=(20000, 3))
    # Diagonal Gaussians: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2 = 5 + 1 = 6.
    assert frechet_distance(a, b) == pytest.approx(6.0, abs=0.15)
    # Against scipy's matrix square root on the same (non-diagonal) sample covariances.
    c = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    d = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)) + 0.3
    ca, cb = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
    ref = ((c.mean(0) - d.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(c, d) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(c, c) == pytest.approx(0.0, abs=1e-6)


def test_identity_classes_need_enough_training_styles() -> None:
    def rec(name: str, style: str) -> Record:
        return Record("f", "c", "s", "l", "", "0", 1, 1, name, style)

    records = [
        rec("a", "x"),
        rec("a", "y"),
        rec("a", "z"),
        rec("b", "x"),
        rec("b", "held"),
        rec("b", "y"),
    ]
    assert identity_classes(records, "held", 3) == ["a"]
    assert identity_classes(records, "", 3) == ["a", "b"]


def test_evaluator_learns_identities_and_reports_held_out_accuracy(
    evaluator_dir: Path, styled_dataset: Path
) -> None:
    ev = Evaluator.load(evaluator_dir)
    assert len(ev.classes) == 12
    scores = ev.config["scores"]
    assert scores["holdout_style"] == "offset style" and scores["holdout_images"] == 12
    # Training styles: far above chance (1/12).
    flat = [Image.open(styled_dataset / f"images/flat-{n}.png") for n in ev.classes]
    top1, top5 = ev.accuracy(flat, [[n] for n in ev.classes])
    assert top1 >= 0.5 and top5 >= top1
    assert 0.0 <= scores["holdout_top1"] <= scores["holdout_top5"] <= 1.0


def test_evaluate_end_to_end_on_a_tiny_model(evaluator_dir: Path, tmp_path: Path, capsys) -> None:
    model = save_diffusers(make_tiny_bundle("sd1", seed=0), tmp_path / "tiny")
    result = evaluate(
        model,
        evaluator_dir,
        n_prompts=5,
        settings=[Setting("Euler", 2), Setting("DPM++ 2M", 3)],
        real_images=40,
    )
    assert result["prompts"] == 5 and len(result["results"]) == 2
    for row in result["results"]:
        assert 0 <= row["top1"] <= row["top5"] <= 1 and row["fd"] >= 0
    ref = result["real_reference"]
    assert ref["fd_real_half_vs_half"] >= 0
    # The autoencoder's ceiling: all 12 held-out images, as drawn and through the tiny model's VAE.
    ev = Evaluator.load(evaluator_dir)
    data = Path(ev.config["dataset"])
    held = [r for r in read_manifest(data) if r.style == "offset style" and r.name in ev.index]
    drawn = [Image.open(data / r.file).convert("RGB").resize((result["size"],) * 2, Image.Resampling.LANCZOS) for r in held]  # fmt: skip
    assert ref["autoencoder_images"] == len(held) == 12
    assert (ref["holdout_sample_top1"], ref["holdout_sample_top5"]) == ev.accuracy(drawn, [[r.name] for r in held])  # fmt: skip
    assert 0 <= ref["autoencoder_top1"] <= ref["autoencoder_top5"] <= 1
    table = markdown_table(result)
    assert "| Euler | 2 |" in table and "| DPM++ 2M | 3 |" in table
    assert "Through the model's autoencoder, 12 of those held-out images" in table
    # CLI: JSON output and clear errors.
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(model), "--evaluator", str(evaluator_dir), "--prompts", "3", "--steps", "2",
            "--samplers", "Euler", "--real-images", "20", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(out.read_text())["results"][0]["steps"] == 2
    capsys.readouterr()
    assert main([*argv[:8], "ten", *argv[9:]]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main([*argv[:10], "Nope", *argv[11:]]) == 2
    assert "Nope" in capsys.readouterr().err


def test_identity_prompts_are_fixed_and_use_name_words() -> None:
    classes = [f"thing-{i}" for i in range(300)] + ["grinning-face"]
    a = identity_prompts(classes, 200)
    assert a == identity_prompts(classes, 200) and len(a) == 200
    assert all(
        p == t[0].replace("-", " ") or p == t[0].rsplit("-", 1)[0].replace("-", " ") for p, t in a
    )


def test_model_card_is_written_from_the_records(styled_dataset: Path, tmp_path: Path) -> None:
    from emaki.eval.card import model_card, run_summary, summaries_from_card

    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset.json").write_text(json.dumps({
        "images": 48, "size": 32, "skin_tones": "one", "duplicates_removed": 0,
        "sources": [{"key": "t", "package": "@x/t", "version": "1", "license": "MIT", "images": 48, "attribution": "T"}],
    }))  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text('kind = "vae"\n')
    # Two parts of a resumed run: 100 s, then a new clock reaching 50 s.
    (run / "log.csv").write_text(
        "step,loss,lr,items_per_s,elapsed_s\n10,0.5,1e-4,1,40\n20,0.4,1e-4,1,100\n30,0.3,1e-4,1,20\n40,0.2,1e-4,1,50\n"
    )
    s = run_summary(run)
    assert s["steps"] == 40 and s["hours"] == round(150 / 3600, 2) and s["last_loss"] == 0.2
    card = model_card(
        title="T", dataset=ds, runs={"vae": run}, eval_json=None, text_choice="MiniLM because."
    )
    assert (
        "| t | @x/t | 1 | MIT | 48 | T |" in card
        and "MiniLM because." in card
        and 'kind = "vae"' in card
    )
    # A later card keeps this run's record once its folder is gone.
    kept = summaries_from_card(card)
    assert kept == {"vae": {**s, "run": None, "recipe": s["recipe"].strip()}}
    again = model_card(
        title="T", dataset=ds, runs={"vae": kept["vae"]}, eval_json=None, text_choice="M."
    )
    assert again.split("### Text encoder")[0] == card.split("### Text encoder")[0]
    assert 'kind = "vae"' in again
