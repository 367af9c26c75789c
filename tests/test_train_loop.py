"""The training loop on a tiny VAE: exact resume, atomic checkpoints, NaN stop, signals, reports."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from emaki.cli import main
from emaki.train.loop import TrainingError, train
from emaki.train.recipe import parse_recipe
from emaki.train.state import list_checkpoints, load_checkpoint
from emaki.train.tasks import VAETask

from train_fixtures import shapes_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes_dataset(tmp_path_factory.mktemp("train-data"))


def _recipe(dataset: Path, out: Path, **over: object) -> str:
    steps = over.get("steps", 6)
    ema = over.get("ema", 0.9)
    accum = over.get("accum", 1)
    return f"""
kind = "vae"
output = "{out}"
[data]
path = "{dataset}"
resolution = 16
bucketing = true
random_crop = true
flip = true
[model]
block_out_channels = [8, 16]
norm_num_groups = 4
latent_channels = 2
edge_weight = 0.1
[train]
steps = {steps}
batch_size = 3
grad_accum = {accum}
ema_decay = {ema}
seed = 3
[optim]
lr = 1e-3
warmup_steps = 2
schedule = "cosine"
[checkpoint]
every = 2
keep = 2
[log]
every = 1
sample_every = 3
"""


def _losses(run: Path) -> list[tuple[int, str]]:
    with (run / "log.csv").open() as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def test_resumed_run_reproduces_the_uninterrupted_losses_and_weights(
    dataset: Path, tmp_path: Path
) -> None:
    full = train(parse_recipe(_recipe(dataset, tmp_path / "full", accum=2)), progress=False)
    assert full.finished and full.step == 6
    part = tmp_path / "part"
    r1 = train(parse_recipe(_recipe(dataset, part, accum=2)), stop_after=3, progress=False)
    assert not r1.finished and r1.step == 3
    assert [p.name for p in list_checkpoints(part)] == [
        "step-00000002",
        "step-00000003",
    ]  # on exit too
    r2 = train(parse_recipe(_recipe(dataset, part, accum=2)), progress=False)
    assert r2.finished and r2.step == 6
    assert _losses(part) == _losses(tmp_path / "full")
    assert len(_losses(part)) == 6
    a = load_checkpoint(list_checkpoints(tmp_path / "full")[-1])
    b = load_checkpoint(list_checkpoints(part)[-1])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    # keep = 2: only the two newest checkpoints remain.
    assert [p.name for p in list_checkpoints(part)] == ["step-00000004", "step-00000006"]


def test_outputs_model_log_curve_and_samples(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = train(parse_recipe(_recipe(dataset, run, steps=4)), progress=False)
    vae = AutoencoderKL.from_pretrained(res.model_dir)  # diffusers opens the export
    assert vae.config.latent_channels == 2
    assert 0 < vae.config.scaling_factor < 100
    ck = load_checkpoint(list_checkpoints(run)[-1])
    # The export holds the EMA weights.
    ema_first = ck["ema"]["0"]
    first_trainable = next(p for p in vae.parameters())
    assert torch.equal(first_trainable.detach(), ema_first)
    assert (run / "loss.png").is_file() and Image.open(run / "loss.png").size == (720, 400)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-00000003.png",
        "step-00000004.png",
    ]
    assert (run / "recipe.toml").read_text().startswith("\nkind")


class _NanAt:
    """Wrap a task so that its loss becomes NaN at a given step."""

    def __init__(self, task: VAETask, step: int) -> None:
        self.task, self.step, self.calls = task, step, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.task, name)

    def loss(self, module, batch, generator):  # type: ignore[no-untyped-def]
        self.calls += 1
        loss = self.task.loss(module, batch, generator)
        return loss * float("nan") if self.calls == self.step else loss


def test_nan_loss_stops_without_saving(dataset: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator

    run = tmp_path / "nan"
    recipe = parse_recipe(_recipe(dataset, run, steps=10))
    acc = Accelerator(cpu=True)
    task = _NanAt(VAETask(recipe, acc), step=4)
    with pytest.raises(TrainingError, match=r"loss became nan at step 4.*step-00000002"):
        train(recipe, task, progress=False, accelerator=acc)  # type: ignore[arg-type]
    names = [p.name for p in list_checkpoints(run)]
    assert names == ["step-00000002"]  # nothing from step 3 or 4
    assert all(
        torch.isfinite(t).all()
        for t in load_checkpoint(list_checkpoints(run)[-1])["model"].values()
    )


class _SignalAt(_NanAt):
    def loss(self, module, batch, generator):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.task.loss(module, batch, generator)


def test_sigterm_stops_after_the_step_with_a_checkpoint(dataset: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator

    run = tmp_path / "sig"
    recipe = parse_recipe(_recipe(dataset, run, steps=10, ema=0.0))
    acc = Accelerator(cpu=True)
    res = train(recipe, _SignalAt(VAETask(recipe, acc), 3), progress=False, accelerator=acc)  # type: ignore[arg-type]
    assert res.step == 3 and not res.finished
    assert list_checkpoints(run)[-1].name == "step-00000003"


def test_changed_recipe_refuses_to_continue_a_run(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    train(parse_recipe(_recipe(dataset, run, steps=2)), progress=False)
    # More steps is fine, and so are other thread counts...
    assert train(parse_recipe(_recipe(dataset, run, steps=3)), progress=False).step == 3
    threads = _recipe(dataset, run, steps=4).replace("[train]", "[train]\nthreads = 1")
    assert train(parse_recipe(threads), progress=False).step == 4
    # ...a different model is not.
    with pytest.raises(TrainingError, match="different recipe"):
        train(
            parse_recipe(_recipe(dataset, run, steps=5).replace("[8, 16]", "[8, 8]")),
            progress=False,
        )


def test_cli_train_and_errors(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(_recipe(dataset, tmp_path / "cli", steps=2))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    assert "finished at step 2" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(_recipe(dataset, tmp_path / "x").replace("batch_size = 3", "batch_size = 50"))
    assert main(["train", str(bad), "--no-progress"]) == 2
    assert "too few for a batch of 50" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_losses(dataset: Path, tmp_path: Path) -> None:
    plain = train(parse_recipe(_recipe(dataset, tmp_path / "plain", steps=3)), progress=False)
    ck = _recipe(dataset, tmp_path / "ck", steps=3).replace(
        "[train]", "[train]\ngradient_checkpointing = true"
    )
    checkpointed = train(parse_recipe(ck), progress=False)
    assert plain.finished and checkpointed.finished
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "ck")
    assert [float(x) for _, x in a] == pytest.approx([float(x) for _, x in b], rel=1e-5)


def test_bf16_autocast_trains(dataset: Path, tmp_path: Path) -> None:
    text = _recipe(dataset, tmp_path / "bf16", steps=3).replace(
        "[train]", '[train]\nmixed_precision = "bf16"'
    )
    res = train(parse_recipe(text), progress=False)
    losses = [float(x) for _, x in _losses(tmp_path / "bf16")]
    assert res.finished and all(np.isfinite(losses))
    # bf16 matmuls: close to the fp32 run, not identical.
    fp32 = train(parse_recipe(_recipe(dataset, tmp_path / "fp32", steps=3)), progress=False)
    assert fp32.finished
    ref = [float(x) for _, x in _losses(tmp_path / "fp32")]
    assert losses[0] == pytest.approx(ref[0], rel=0.05)
