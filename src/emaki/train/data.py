"""Training data: a dataset folder's records, bucketed batches, and image loading.

Images are bucketed by aspect ratio (NovelAI's algorithm, ``emaki.train.buckets``) or, with
``data.bucketing = false``, all served square at ``data.resolution``. Each image is scaled to cover
its bucket and the overhang cropped: at random (seeded by seed, epoch and image, so resumption
is exact) or centred. The catch-all batches of NovelAI's algorithm are served at the base size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from emaki.data.manifest import Record, read_manifest
from emaki.errors import EmakiError
from emaki.train.buckets import (
    Assignment,
    BucketBatcher,
    BucketSpec,
    assign_buckets,
    fit_and_crop_box,
    generate_buckets,
)
from emaki.train.recipe import DataConfig


class TrainDataError(EmakiError):
    """The training data cannot be used (empty, too few images for a batch, unreadable image)."""


def load_records(cfg: DataConfig) -> list[Record]:
    records = read_manifest(cfg.path)
    if cfg.limit:
        records = records[: cfg.limit]
    if not records:
        raise TrainDataError(f"dataset {cfg.path} has no records")
    return records


def make_assignment(
    records: list[Record], cfg: DataConfig, multiple: int
) -> tuple[Assignment, tuple[int, int]]:
    """Bucket the records (or put them all in one square bucket). Returns the assignment and base size."""
    if cfg.bucketing:
        spec = BucketSpec.scaled(cfg.resolution, multiple=multiple)
        buckets = generate_buckets(spec)
        return assign_buckets([(r.width, r.height) for r in records], spec, buckets), spec.base
    base = (cfg.resolution, cfg.resolution)
    spec = BucketSpec(base=base, max_size=base, divisible=multiple, min_dim=cfg.resolution,
                      dim_limit=cfg.resolution, max_ar_error=float("inf"))  # fmt: skip
    return assign_buckets([(r.width, r.height) for r in records], spec, [base]), base


def load_fitted(
    path: Path, size: tuple[int, int], rng: np.random.Generator | None, flip: bool
) -> np.ndarray:
    """An image scaled to cover ``size``, cropped to it, optionally mirrored; uint8 HWC RGB."""
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except OSError as e:
        raise TrainDataError(f"cannot read training image {path}: {e}") from e
    (sw, sh), box = fit_and_crop_box(img.size, size, rng)
    if (sw, sh) != img.size:
        img = img.resize((sw, sh), Image.Resampling.LANCZOS)
    img = img.crop(box)
    arr = np.asarray(img, dtype=np.uint8)
    if flip:
        arr = arr[:, ::-1]
    return arr


def to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images → float NCHW in [-1, 1]."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class ImageBatches:
    """Bucketed batches of (record ids, image tensor) from a dataset folder, resumable exactly."""

    def __init__(
        self,
        cfg: DataConfig,
        batch_size: int,
        seed: int,
        world_size: int,
        rank: int,
        multiple: int = 8,
        keep: Callable[[Record], bool] | None = None,
    ):
        self.cfg = cfg
        self.records = load_records(cfg)
        if keep is not None:
            self.records = [r for r in self.records if keep(r)]
            if not self.records:
                raise TrainDataError(f"no records of {cfg.path} are left for training")
        self.seed = seed
        assignment, base = make_assignment(self.records, cfg, multiple)
        self.batcher = BucketBatcher(
            assignment, batch_size, base, seed=seed, world_size=world_size, rank=rank
        )
        if self.batcher.batches_per_epoch == 0:
            raise TrainDataError(
                f"{len(self.records)} images are too few for a batch of {batch_size}"
                + (f" on {world_size} processes" if world_size > 1 else "")
            )

    def next_ids(self) -> tuple[list[int], tuple[int, int]]:
        return self.batcher.next_batch()

    def load(self, ids: list[int], size: tuple[int, int], augment: bool = True) -> torch.Tensor:
        """The images fitted to ``size``: randomly cropped and mirrored as the recipe asks (seeded
        by seed, epoch and image), or centre-cropped and unmirrored without ``augment`` (what
        latent caching encodes)."""
        arrays = []
        for i in ids:
            crop = augment and self.cfg.random_crop
            rng = np.random.default_rng([self.seed, self.batcher.epoch, i]) if crop else None
            flip = bool(
                augment
                and self.cfg.flip
                and np.random.default_rng([self.seed, self.batcher.epoch, i, 1]).random() < 0.5
            )
            arrays.append(load_fitted(Path(self.cfg.path) / self.records[i].file, size, rng, flip))
        return to_tensor(arrays)

    def state_dict(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batcher.load_state_dict(state)


class BatchesTask:
    """What every recipe kind's task shares: its ``ImageBatches`` and their resumable state."""

    data: ImageBatches

    @staticmethod
    def batches(
        recipe: Any,
        accelerator: Any,
        multiple: int = 8,
        keep: Callable[[Record], bool] | None = None,
    ) -> ImageBatches:
        return ImageBatches(
            recipe.data, recipe.train.batch_size, recipe.train.seed, accelerator.num_processes,
            accelerator.process_index, multiple=multiple, keep=keep,
        )  # fmt: skip

    def data_state(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)

    def samples(self, module: torch.nn.Module) -> tuple[list[Image.Image], list[str]]:
        """No sample grid unless the kind has one."""
        return [], []
