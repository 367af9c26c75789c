"""The documentation's commands run as written.

Every ```sh block in README.md and docs/*.md runs with bash from the repository root (except the
README's set-up block, which holds a placeholder path and the test command itself), and each
page's ```python blocks run in order as one script. A failing command fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
SKIP_MARKERS = ("PATH/TO", "bin/test")


def _blocks(page: Path, lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(page.read_text()) if kind == lang]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _runnable(page: Path) -> list[str]:
    return [b for b in _blocks(page, "sh") if not any(m in b for m in SKIP_MARKERS)]


SH_CASES = [
    pytest.param(page, i, body, id=f"{page.name}-sh{i}")
    for page in PAGES
    for i, body in enumerate(_runnable(page))
]


def _clean_tmp_outputs() -> None:
    """Pages write under /tmp/tiny-sd1* and /tmp/emaki-out; each starts from nothing."""
    subprocess.run("rm -rf /tmp/tiny-sd1* /tmp/emaki-out /tmp/apple.png", shell=True, check=True)


@pytest.mark.parametrize(("page", "index", "body"), SH_CASES)
def test_shell_block_runs(page: Path, index: int, body: str) -> None:
    if index == 0:
        _clean_tmp_outputs()
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", body],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{page.name} block {index} failed:\n{body}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "python")], ids=lambda p: p.name)
def test_python_blocks_run(page: Path) -> None:
    script = "\n".join(_blocks(page, "python"))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{page.name} python failed:\n{proc.stderr[-3000:]}"
