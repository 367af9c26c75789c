"""NovelAI aspect-ratio bucketing against the numbers NovelAI published and its stated rules."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from emaki.train.buckets import (
    BucketBatcher,
    BucketSpec,
    assign_buckets,
    fit_and_crop_box,
    generate_buckets,
)

# NovelAI's README sample output at its defaults (19 buckets, aspects 0.25 ... 4.0).
NAI_BUCKETS = [
    (256, 1024), (320, 1024), (384, 1024), (384, 960), (384, 896), (448, 832), (512, 768),
    (512, 704), (512, 512), (576, 640), (640, 576), (704, 512), (768, 512), (832, 448),
    (896, 384), (960, 384), (1024, 384), (1024, 320), (1024, 256),
]  # fmt: skip


def test_buckets_at_novelai_defaults_match_the_published_list() -> None:
    assert generate_buckets(BucketSpec()) == NAI_BUCKETS


@pytest.mark.parametrize("res", [64, 128, 256])
def test_scaled_buckets_are_the_published_list_scaled(res: int) -> None:
    k = 512 // res
    assert generate_buckets(BucketSpec.scaled(res)) == [(w // k, h // k) for w, h in NAI_BUCKETS]


def test_assignment_nearest_aspect_and_extreme_images_dropped() -> None:
    spec = BucketSpec()
    sizes = [(512, 512), (1000, 500), (300, 1200), (5000, 500), (640, 600)]
    a = assign_buckets(sizes, spec)
    where = {i: a.buckets[b] for b, ids in a.members.items() for i in ids}
    assert where[0] == (512, 512)
    aspects = np.array([w / h for w, h in a.buckets])
    assert where[1] == a.buckets[int(np.abs(aspects - 2.0).argmin())]
    assert where[2] == (256, 1024)
    assert a.dropped == [3]  # aspect 10: error 6 >= 4
    assert where[4] == (640, 576)  # aspect 1.067: 1.111 is nearer than 1.0
    assert a.errors[0] == 0.0


def _batcher(
    sizes: list[tuple[int, int]], bsz: int, seed: int = 0, world: int = 1, rank: int = 0
) -> BucketBatcher:
    spec = BucketSpec.scaled(64)
    return BucketBatcher(
        assign_buckets(sizes, spec), bsz, spec.base, seed=seed, world_size=world, rank=rank
    )


def _mixed_sizes(n: int, seed: int = 1) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(32, 129)), int(rng.integers(32, 129))) for _ in range(n)]


def test_one_epoch_serves_each_image_at_most_once_in_its_bucket() -> None:
    sizes = _mixed_sizes(203)
    b = _batcher(sizes, bsz=4)
    a = b.a
    bucket_of = {i: a.buckets[k] for k, ids in a.members.items() for i in ids}
    seen: list[int] = []
    for _ in range(b.batches_per_epoch):
        ids, res = b.next_batch()
        assert len(ids) == 4
        if res != b.base or not all(bucket_of[i] == b.base for i in ids):
            # A bucket batch: every image comes from that bucket. Catch-all batches use the base size.
            assert all(bucket_of[i] == res for i in ids) or res == b.base
        seen.extend(ids)
    assert len(seen) == len(set(seen)) == b.batches_per_epoch * 4 == 200
    assert b.epoch == 0
    b.next_batch()
    assert b.epoch == 1


def test_ranks_are_disjoint_shards_of_the_same_epoch() -> None:
    sizes = _mixed_sizes(101)
    r0, r1 = _batcher(sizes, 3, world=2, rank=0), _batcher(sizes, 3, world=2, rank=1)
    s0 = {i for _ in range(r0.batches_per_epoch) for i in r0.next_batch()[0]}
    s1 = {i for _ in range(r1.batches_per_epoch) for i in r1.next_batch()[0]}
    assert not s0 & s1
    assert len(s0) == len(s1) == 48  # 101 truncated to 96, half each


def test_resume_replays_exactly() -> None:
    sizes = _mixed_sizes(150)
    ref = _batcher(sizes, 5, seed=7)
    for _ in range(47):  # into the second epoch
        ref.next_batch()
    state = ref.state_dict()
    expected = [ref.next_batch() for _ in range(20)]
    resumed = _batcher(sizes, 5, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(20)] == expected


def test_bucket_choice_is_proportional_to_remaining_size() -> None:
    # 90 square images and 10 wide ones, batch size 1: the first draw picks the square bucket
    # with probability 0.9.
    sizes = [(64, 64)] * 90 + [(128, 32)] * 10
    firsts = Counter(_batcher(sizes, 1, seed=s).next_batch()[1] for s in range(400))
    frac = firsts[(64, 64)] / 400
    assert 0.85 < frac < 0.95


def test_small_bucket_overhang_goes_to_catch_all_at_base_resolution() -> None:
    sizes = [(64, 64)] * 8 + [(128, 32)] * 3  # bsz 4: the wide bucket's 3 go to the catch-all list
    b = _batcher(sizes, 4)
    batches = [b.next_batch() for _ in range(b.batches_per_epoch)]
    assert all(res == (64, 64) for _, res in batches)
    assert b.batches_per_epoch == 2


def test_fit_and_crop_box_covers_target_and_crops_overhang() -> None:
    (sw, sh), box = fit_and_crop_box((100, 50), (64, 64), None)
    assert (sw, sh) == (128, 64) and box == (32, 0, 96, 64)
    rng = np.random.default_rng(0)
    lefts = {fit_and_crop_box((100, 50), (64, 64), rng)[1][0] for _ in range(50)}
    assert min(lefts) >= 0 and max(lefts) <= 64 and len(lefts) > 5
