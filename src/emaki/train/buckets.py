"""NovelAI aspect-ratio bucketing (NovelAI, "NovelAI Improvements on Stable Diffusion", 2022).

The algorithm is NovelAI's, step for step, with its defaults scaled from 512 px to the recipe's
resolution (every length times ``resolution / 512``):

* **Buckets**: for each width from ``min_dim`` in steps of ``divisible`` (while a ``min_dim``-high
  image fits the area budget and the side limit), the largest height that keeps
  ``width × height ≤ max_w × max_h`` and ``height ≤ dim_limit``; then the same with width and height
  exchanged; the square base resolution is added where a column passes over it; duplicates removed;
  sorted by ``w·4096 − h``.
* **Assignment**: each image goes to the bucket of nearest aspect ratio; images whose aspect error is
  ``max_ar_error`` or more are left out.
* **Epochs**: the ids are permuted with the epoch generator, truncated to a multiple of
  ``batch_size × world_size`` and sharded by rank; each bucket keeps its ids of this shard, shuffled,
  and moves its first ``len % batch_size`` ("overhang") to a catch-all list.
* **Batches**: a bucket (or the catch-all list, if it holds a full batch) is drawn with probability
  proportional to how many ids it still holds; the catch-all list is served at the base (square)
  resolution; a bucket with fewer than a batch left is moved to the catch-all list.

Written here rather than imported because NovelAI's reference is a standalone script, not a
maintained library. One deliberate difference makes exact resumption possible: the generators are
derived from ``(seed, epoch)`` rather than carried across epochs, so the state after any number of
batches is reproduced by replaying that epoch (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

NAI_BASE = 512
NAI_MAX_SIZE = (768, 512)
NAI_DIVISIBLE = 64
NAI_MIN_DIM = 256
NAI_DIM_LIMIT = 1024
NAI_MAX_AR_ERROR = 4.0


@dataclass(frozen=True)
class BucketSpec:
    """NovelAI's bucket parameters, in pixels."""

    base: tuple[int, int] = (NAI_BASE, NAI_BASE)
    max_size: tuple[int, int] = NAI_MAX_SIZE
    divisible: int = NAI_DIVISIBLE
    min_dim: int = NAI_MIN_DIM
    dim_limit: int = NAI_DIM_LIMIT
    max_ar_error: float = NAI_MAX_AR_ERROR

    @classmethod
    def scaled(cls, resolution: int, multiple: int = 8) -> BucketSpec:
        """NovelAI's defaults scaled from 512 px to ``resolution`` (lengths rounded to ``multiple``)."""

        def s(v: int) -> int:
            return max(multiple, round(v * resolution / NAI_BASE / multiple) * multiple)

        return cls(
            base=(s(NAI_BASE), s(NAI_BASE)),
            max_size=(s(NAI_MAX_SIZE[0]), s(NAI_MAX_SIZE[1])),
            divisible=s(NAI_DIVISIBLE),
            min_dim=s(NAI_MIN_DIM),
            dim_limit=s(NAI_DIM_LIMIT),
        )


def generate_buckets(spec: BucketSpec) -> list[tuple[int, int]]:
    """The bucket resolutions ``(w, h)``, in NovelAI's order."""
    area = spec.max_size[0] * spec.max_size[1]
    found: dict[tuple[int, int], None] = {}

    def sweep(swap: bool) -> None:
        outer = spec.min_dim
        while outer * spec.min_dim <= area and outer <= spec.dim_limit:
            inner = spec.min_dim
            passed_base = False
            while (
                outer * (inner + spec.divisible) <= area
                and inner + spec.divisible <= spec.dim_limit
            ):
                if ((inner, outer) if swap else (outer, inner)) == spec.base:
                    passed_base = True
                inner += spec.divisible
            res = (inner, outer) if swap else (outer, inner)
            if res != spec.base and passed_base:
                found.setdefault(spec.base)
            found.setdefault(res)
            outer += spec.divisible

    sweep(False)
    sweep(True)
    return sorted(found, key=lambda r: r[0] * 4096 - r[1])


@dataclass
class Assignment:
    buckets: list[tuple[int, int]]
    members: dict[int, list[int]]  # bucket index -> image ids
    errors: dict[int, float]  # image id -> aspect error
    dropped: list[int]


def assign_buckets(
    sizes: Sequence[tuple[int, int]], spec: BucketSpec, buckets: list[tuple[int, int]] | None = None
) -> Assignment:
    """Put image ``i`` (of size ``sizes[i] = (w, h)``) into the bucket of nearest aspect ratio."""
    buckets = buckets or generate_buckets(spec)
    aspects = np.array([w / h for w, h in buckets])
    members: dict[int, list[int]] = {}
    errors: dict[int, float] = {}
    dropped: list[int] = []
    for i, (w, h) in enumerate(sizes):
        a = w / h
        b = int(np.abs(aspects - a).argmin())
        err = float(abs(aspects[b] - a))
        if err < spec.max_ar_error:
            members.setdefault(b, []).append(i)
            errors[i] = err
        else:
            dropped.append(i)
    return Assignment(buckets, members, errors, dropped)


LEFTOVER = -1


class BucketBatcher:
    """Yields ``(ids, (w, h))`` batches as NovelAI's bucket manager does, resumable exactly."""

    def __init__(
        self,
        assignment: Assignment,
        batch_size: int,
        base: tuple[int, int],
        seed: int = 42,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.a = assignment
        self.bsz = batch_size
        self.base = base
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.ids = sorted(i for m in assignment.members.values() for i in m)
        self.epoch = 0
        self.delivered = 0
        self._start_epoch()

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.ids) - len(self.ids) % (self.bsz * self.world_size)
        return n // self.world_size // self.bsz

    def _start_epoch(self) -> None:
        shard_rng = np.random.default_rng([self.seed, self.epoch, 0])
        self._rng = np.random.default_rng([self.seed, self.epoch, 1])
        index = shard_rng.permutation(np.array(self.ids, dtype=np.int64))
        index = index[: len(index) - len(index) % (self.bsz * self.world_size)]
        index = index[self.rank :: self.world_size]
        self._total = len(index) // self.bsz
        keep = set(index.tolist())
        self._pool: dict[int, list[int]] = {}
        self._leftover: list[int] = []
        for b in sorted(self.a.members):
            ids = np.array([i for i in self.a.members[b] if i in keep], dtype=np.int64)
            self._rng.shuffle(ids)
            lst = ids.tolist()
            over = len(lst) % self.bsz
            if over:
                self._leftover.extend(lst[:over])
                lst = lst[over:]
            if lst:
                self._pool[b] = lst
        self.delivered = 0

    def next_batch(self) -> tuple[list[int], tuple[int, int]]:
        if self._total == 0:
            raise ValueError(
                f"{len(self.ids)} images are too few for one batch of {self.bsz} on {self.world_size} process(es)"
            )
        if self.delivered >= self._total or (not self._pool and len(self._leftover) < self.bsz):
            self.epoch += 1
            self._start_epoch()
        while True:
            keys = list(self._pool)
            sizes = [len(self._pool[k]) for k in keys]
            if len(self._leftover) >= self.bsz:
                keys = [LEFTOVER, *keys]
                sizes = [len(self._leftover), *sizes]
            if self._pool:
                p = np.array(sizes, dtype=np.float64)
                choice = int(self._rng.choice(np.array(keys), p=p / p.sum()))
            else:
                choice = LEFTOVER
            if choice == LEFTOVER:
                self._rng.shuffle(self._leftover)
                batch, self._leftover = self._leftover[: self.bsz], self._leftover[self.bsz :]
                res = self.base
                break
            ids = self._pool[choice]
            if len(ids) >= self.bsz:
                batch, self._pool[choice] = ids[: self.bsz], ids[self.bsz :]
                if not self._pool[choice]:
                    del self._pool[choice]
                res = self.a.buckets[choice]
                break
            self._leftover.extend(ids)
            del self._pool[choice]
        self.delivered += 1
        return [int(i) for i in batch], res

    def __iter__(self) -> Iterator[tuple[list[int], tuple[int, int]]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "delivered": self.delivered, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the position after ``delivered`` batches of ``epoch`` by replaying that epoch."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._start_epoch()
        for _ in range(int(state["delivered"])):
            self.next_batch()


def fit_and_crop_box(
    size: tuple[int, int], target: tuple[int, int], rng: np.random.Generator | None
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """NovelAI's image fitting: scale (keeping aspect) so the image covers ``target`` exactly on one
    side and overhangs on the other, then crop the overhang (at random, or centred without ``rng``).

    Returns the scaled size and the crop box ``(left, top, right, bottom)`` in scaled pixels.
    """
    w, h = size
    tw, th = target
    scale = max(tw / w, th / h)
    sw, sh = max(tw, round(w * scale)), max(th, round(h * scale))
    dx, dy = sw - tw, sh - th
    if rng is None:
        left, top = dx // 2, dy // 2
    else:
        left = int(rng.integers(0, dx + 1))
        top = int(rng.integers(0, dy + 1))
    return (sw, sh), (left, top, left + tw, top + th)
