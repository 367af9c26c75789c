"""The training loop shared by every recipe kind: accelerate, checkpoints, resume, logs, samples.

What a kind contributes is a :class:`Task`: the trainable module, how to draw a batch, the loss,
sample images and the export to emaki's native format. The loop does the rest the same way for
all of them:

* **Distribution and precision** through 🤗 accelerate (``Accelerator``: one process on CPU or
  GPU, or many with ``accelerate launch``; bf16 autocast); gradient accumulation with
  ``no_sync`` on all but the last micro-batch.
* **Exact resumption**: every random draw of step *s* comes from a generator seeded by
  ``(seed, s, micro-batch, rank)``, and the data order from ``(seed, epoch)``, so a resumed run
  needs only the weights, optimizer, LR-scheduler, EMA and data-position state that the
  checkpoint holds (``emaki.train.state``) to reproduce the uninterrupted run's losses exactly.
* **Safety**: checkpoints every ``checkpoint.every`` steps and when the run stops (end, Ctrl-C,
  SIGTERM), written atomically; a NaN or Inf loss stops the run at once with a message and
  nothing is saved from that step.
* **Reporting**: a progress bar (it/s, ETA, loss), ``log.csv``, ``loss.png`` and a sample grid
  ``samples/step-N.png`` every ``log.sample_every`` steps.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from emaki.errors import EmakiError
from emaki.train.recipe import Recipe, parse_recipe
from emaki.train.report import loss_curve_png, save_grid
from emaki.train.state import list_checkpoints, load_checkpoint, save_checkpoint


class TrainingError(EmakiError):
    """Training cannot go on (diverged, or the run folder belongs to another recipe)."""


class Task(Protocol):
    """What one recipe kind provides to the loop."""

    def module(self) -> torch.nn.Module:
        """The trainable network (its parameters are optimized and EMA-averaged)."""
        ...

    def next_batch(self) -> Any: ...

    def loss(
        self, module: torch.nn.Module, batch: Any, generator: torch.Generator
    ) -> torch.Tensor: ...

    def data_state(self) -> dict[str, Any]: ...

    def load_data_state(self, state: dict[str, Any]) -> None: ...

    def samples(self, module: torch.nn.Module) -> tuple[list[Any], list[str]]:
        """Images and labels for the sample grid (the module holds the EMA weights if any)."""
        ...

    def export(self, module: torch.nn.Module, dest: Path) -> Path:
        """Write the trained model in emaki's native format."""
        ...


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator for all random draws of one micro-batch of one step."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    finished: bool
    model_dir: Path | None
    last_loss: float


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the end of the current step (a second SIGINT aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nemaki: stopping after this step (checkpointing); Ctrl-C again to abort",
            file=sys.stderr,
        )

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """A run folder continues only the recipe that started it.

    ``train.steps``, ``train.threads`` (an execution setting: a run may resume on a machine with
    more cores), ``[checkpoint]`` and ``[log]`` may change.
    """
    stored = run_dir / "recipe.toml"
    if not stored.is_file():
        return
    old = parse_recipe(stored.read_text(encoding="utf-8"), str(stored))
    new = copy.deepcopy(recipe)
    for r in (old, new):
        r.source = ""
        r.train.steps = r.train.threads = 0
        r.checkpoint.every = r.checkpoint.keep = 1
        r.log = type(r.log)()
    if old != new:
        raise TrainingError(
            f"{run_dir} holds a run of a different recipe; change only train.steps, train.threads, "
            "checkpoint and log settings to continue it, or choose a new output folder"
        )


def _lr_lambda(recipe: Recipe) -> Any:
    warm = recipe.optim.warmup_steps
    total = recipe.train.steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if recipe.optim.schedule == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def _read_log(path: Path, upto: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= upto]


LOG_FIELDS = ("step", "loss", "lr", "items_per_s", "elapsed_s")


def train(
    recipe: Recipe,
    task: Task | None = None,
    *,
    stop_after: int | None = None,
    progress: bool = True,
    accelerator: Any = None,
) -> TrainResult:
    """Run (or resume) a recipe until ``train.steps`` (or ``stop_after`` steps in this call)."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    run_dir = Path(recipe.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(run_dir, recipe)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    if accelerator is None:
        _allow_new_precision(recipe.train.mixed_precision)
    acc = accelerator or Accelerator(
        mixed_precision=recipe.train.mixed_precision, cpu=not torch.cuda.is_available()
    )
    if task is None:
        from emaki.train.tasks import make_task

        task = make_task(recipe, acc)
    module = task.module()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=recipe.optim.lr,
        betas=(recipe.optim.beta1, recipe.optim.beta2),
        weight_decay=recipe.optim.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe))
    ema = (
        EMAModel(params, decay=recipe.train.ema_decay, use_ema_warmup=False)
        if recipe.train.ema_decay
        else None
    )

    step = 0
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        ck = load_checkpoint(checkpoints[-1])
        module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["meta"]["scheduler"])
        task.load_data_state(ck["meta"]["data"])
        if ema is not None:
            if ck["ema"] is None:
                raise TrainingError(
                    f"{checkpoints[-1]} has no EMA weights but the recipe asks for EMA"
                )
            ema.load_state_dict(
                {
                    **ck["meta"]["ema"],
                    "shadow_params": [ck["ema"][f"{i}"] for i in range(len(params))],
                }
            )
        step = int(ck["meta"]["step"])
    if acc.is_main_process:
        (run_dir / "recipe.toml").write_text(recipe.source, encoding="utf-8")
    module, opt = acc.prepare(module, opt)
    if ema is not None:
        ema.to(acc.device)

    log_path = run_dir / "log.csv"
    rows = _read_log(log_path, step)
    if acc.is_main_process:
        with log_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)

    total = recipe.train.steps
    end = total if stop_after is None else min(total, step + stop_after)
    accum = recipe.train.grad_accum
    bar = tqdm(
        total=total, initial=step, unit="step", disable=not (progress and acc.is_main_process),
        file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
    window: list[float] = []
    t0 = time.perf_counter()
    items_since = 0
    last_loss = float("nan")
    saved_step = step  # the newest checkpoint's step (the one resumed from, if any)

    def checkpoint() -> None:
        nonlocal saved_step
        saved_step = step
        if not acc.is_main_process:
            return
        unwrapped = acc.unwrap_model(module)
        meta = {
            "scheduler": sched.state_dict(),
            "data": task.data_state(),
            "ema": (
                {k: v for k, v in ema.state_dict().items() if k != "shadow_params"} if ema else None
            ),
        }
        ema_t = {f"{i}": t for i, t in enumerate(ema.shadow_params)} if ema is not None else None
        save_checkpoint(
            run_dir,
            step,
            unwrapped.state_dict(),
            opt.state_dict(),
            meta,
            ema_t,
            keep=recipe.checkpoint.keep,
        )

    def sample_grid() -> None:
        if not acc.is_main_process:
            return
        unwrapped = acc.unwrap_model(module)
        with _ema_weights(ema, unwrapped), torch.no_grad():
            images, labels = task.samples(unwrapped)
        if images:
            cols = getattr(task, "grid_cols", None)
            save_grid(images, labels, run_dir / "samples" / f"step-{step:08d}.png", cols=cols)

    with _StopFlag() as stop:
        try:
            while step < end and not stop.requested:
                module.train()
                loss_sum = 0.0
                for micro in range(accum):
                    batch = task.next_batch()
                    gen = step_generator(recipe.train.seed, step, micro, acc.process_index)

                    def sync(last: bool = micro == accum - 1) -> contextlib.AbstractContextManager:
                        return contextlib.nullcontext() if last else acc.no_sync(module)

                    with sync(), acc.autocast():
                        loss = task.loss(module, batch, gen)
                    if not torch.isfinite(loss.detach()).all():
                        last = list_checkpoints(run_dir)
                        raise TrainingError(
                            f"loss became {loss.item()} at step {step + 1}; stopped without saving "
                            + (
                                f"(last good checkpoint: {last[-1]})"
                                if last
                                else "(no checkpoint yet)"
                            )
                            + "; lower optim.lr or check the data"
                        )
                    with sync():
                        acc.backward(loss / accum)
                    loss_sum += loss.item() / accum
                    items_since += _batch_len(batch)
                if recipe.optim.grad_clip > 0:
                    norm = acc.clip_grad_norm_(module.parameters(), recipe.optim.grad_clip)
                    if norm is not None and not math.isfinite(float(norm)):
                        raise TrainingError(
                            f"gradient norm became {float(norm)} at step {step + 1}; stopped without saving"
                        )
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step([p for p in acc.unwrap_model(module).parameters() if p.requires_grad])
                step += 1
                last_loss = loss_sum
                window.append(loss_sum)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}")
                if step % recipe.log.every == 0 or step == end:
                    elapsed = time.perf_counter() - t0
                    row = {
                        "step": step,
                        "loss": f"{sum(window) / len(window):.6g}",
                        "lr": f"{sched.get_last_lr()[0]:.6g}",
                        "items_per_s": f"{items_since / max(elapsed, 1e-9):.3f}",
                        "elapsed_s": f"{elapsed:.1f}",
                    }
                    window.clear()
                    if acc.is_main_process:
                        rows.append(row)
                        with log_path.open("a", newline="") as f:
                            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)
                        loss_curve_png(
                            [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], run_dir / "loss.png",
                            title=f"{recipe.kind} training loss",
                        )  # fmt: skip
                if recipe.log.sample_every and step % recipe.log.sample_every == 0:
                    sample_grid()
                if step % recipe.checkpoint.every == 0:
                    checkpoint()
        finally:
            bar.close()
        # Reached only without an exception: checkpoint where we stopped (end, limit or signal).
        if saved_step != step or (not checkpoints and step == 0):
            checkpoint()
    acc.wait_for_everyone()
    model_dir = None
    finished = step >= total
    if finished and acc.is_main_process:
        if recipe.log.sample_every and step % recipe.log.sample_every != 0:
            sample_grid()
        unwrapped = acc.unwrap_model(module)
        with _ema_weights(ema, unwrapped):
            model_dir = task.export(unwrapped, run_dir / "model")
    return TrainResult(run_dir, step, finished, model_dir, last_loss)


def export_checkpoint(recipe: Recipe, dest: Path, checkpoint: Path | None = None) -> Path:
    """Export a checkpoint of a run (the newest by default) as a model, with its EMA weights.

    What the run would export if it finished at that step: a preview of a long run that keeps
    training (kohya's "save every N steps"). The run's own checkpoints are not touched.
    """
    from accelerate import Accelerator

    from emaki.train.tasks import make_task

    run_dir = Path(recipe.output)
    if checkpoint is None:
        found = list_checkpoints(run_dir)
        if not found:
            raise TrainingError(f"{run_dir} has no checkpoints to export")
        checkpoint = found[-1]
    ck = load_checkpoint(checkpoint)
    task = make_task(recipe, Accelerator(cpu=True))
    module = task.module()
    module.load_state_dict(ck["model"])
    if ck["ema"] is not None:
        params = [p for p in module.parameters() if p.requires_grad]
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(ck["ema"][f"{i}"])
    return task.export(module, Path(dest))


def _allow_new_precision(wanted: str) -> None:
    """accelerate keeps one precision per process; let a later run in the same process choose another.

    Only the accelerator-level state is reset (never the process/distributed state), and only when
    it was set with a different precision, as when a program trains several recipes in turn.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != wanted:
        AcceleratorState._reset_state(reset_partial_state=False)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return int(v.shape[0])
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return 1


@contextlib.contextmanager
def _ema_weights(ema: Any, module: torch.nn.Module) -> Iterator[None]:
    """Temporarily put the EMA weights into ``module`` (no-op without EMA)."""
    if ema is None:
        yield
        return
    params = [p for p in module.parameters() if p.requires_grad]
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
