"""The allocator tuning: it removes most per-call page faults and does not grow memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import resource, sys
if sys.argv[1] == "tuned":
    from emaki.runtime import tune_allocator
    assert tune_allocator()
import torch

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def step(keep):
    x = torch.empty(64 * 2**20 // 4)  # a 64 MiB activation-like buffer
    x.fill_(1.0)
    keep.append(torch.empty(1000))  # a small survivor between large blocks (fragmentation)

keep = []
step(keep)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step(keep)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(40):
    step(keep)
print(faults, rss_mb())
"""

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages"
)
def test_tuned_allocator_faults_less_and_does_not_grow() -> None:
    def run(mode: str) -> tuple[int, float]:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env
        )
        assert out.returncode == 0, out.stderr
        faults, rss = out.stdout.split()
        return int(faults), float(rss)

    (plain_faults, plain_rss), (tuned_faults, tuned_rss) = run("plain"), run("tuned")
    pages_per_step = 64 * 2**20 // 4096
    assert plain_faults > 4 * pages_per_step  # each 64 MiB block is faulted in again
    assert tuned_faults < plain_faults / 4
    assert tuned_rss < plain_rss + 256  # no unbounded growth over 45 steps
