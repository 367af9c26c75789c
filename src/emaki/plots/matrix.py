"""A1111's prompt matrix: ``base|a|b`` makes every combination of the optional parts.

The first part is always kept; each of the ``n`` others is on or off, giving ``2**n`` prompts
(joined with ", "), all with the same seed. The grid puts the first half of the options on the
columns and the rest on the rows, labelled with the options each cell has (A1111 marks the ones
it lacks; we print "-" before them).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

from PIL import Image

from emaki.errors import InvalidRequestError
from emaki.plots.grid import labelled_grid
from emaki.plots.xyz import Generate
from emaki.request import GenerationRequest


def matrix_prompts(text: str) -> tuple[list[str], list[tuple[bool, ...]]]:
    """All prompts of a matrix, in binary order (option i on when bit i is set)."""
    base, *options = (p.strip() for p in text.split("|"))
    if not options:
        raise InvalidRequestError("a prompt matrix needs at least one '|' option: 'base|a|b'")
    if len(options) > 8:
        raise InvalidRequestError("a prompt matrix takes at most 8 options (256 images)")
    prompts, flags = [], []
    for n in range(2 ** len(options)):
        on = tuple(bool(n >> i & 1) for i in range(len(options)))
        parts = [base] + [o for o, f in zip(options, on) if f]
        prompts.append(", ".join(p for p in parts if p))
        flags.append(on)
    return prompts, flags


@dataclass(frozen=True)
class MatrixResult:
    grid: Image.Image
    images: list[Image.Image]
    prompts: list[str]
    infotext: str


def run_prompt_matrix(
    generate: Generate, request: GenerationRequest, *, in_negative: bool = False
) -> MatrixResult:
    """Generate the matrix of ``request.prompt`` (or of its negative prompt)."""
    text = request.negative_prompt if in_negative else request.prompt
    prompts, flags = matrix_prompts(text)
    options = [p.strip() for p in text.split("|")[1:]]
    if request.seed == -1:
        request = replace(request, seed=secrets.randbelow(2**32))
    images, infos = [], []
    for p in prompts:
        r = replace(request, negative_prompt=p) if in_negative else replace(request, prompt=p)
        result = generate(r, None)
        images.append(result.images[0])
        infos.append(result.infotexts[0])
    cols_n = (len(options) + 1) // 2  # options on the columns; the rest on the rows
    ncols, nrows = 2**cols_n, 2 ** (len(options) - cols_n)

    def label(bits: tuple[bool, ...], opts: list[str]) -> str:
        return " ".join(o if b else f"-{o}" for o, b in zip(opts, bits))

    rows = [[images[r * ncols + c] for c in range(ncols)] for r in range(nrows)]
    col_labels = [label(flags[c][:cols_n], options[:cols_n]) for c in range(ncols)]
    row_labels = [label(flags[r * ncols][cols_n:], options[cols_n:]) for r in range(nrows)]
    grid = labelled_grid(rows, col_labels, row_labels if len(options) > cols_n else [""] * nrows)
    return MatrixResult(grid, images, prompts, infos[0])
