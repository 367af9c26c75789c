"""Run an X/Y/Z plot (A1111's ``xyz_grid.py`` semantics) through any generate function.

X values are columns, Y values rows, Z values separate grids (plus, with more than one Z value,
a sheet of all of them). A seed of -1 is drawn once for the whole plot, so cells differ only by
their axis values. Cells run in an order that changes the model least often (a "Checkpoint
name" axis is outermost). Each cell shows the first image of its job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from emaki.plots.axes import AXES, Axis
from emaki.plots.grid import labelled_grid
from emaki.request import GenerationRequest

#: ``generate(request, model) -> GenerationResult`` (model: a Checkpoint-name value or None).
Generate = Callable[[GenerationRequest, str | None], Any]


@dataclass(frozen=True)
class Cell:
    x: int
    y: int
    z: int
    image: Image.Image
    infotext: str


@dataclass(frozen=True)
class XYZResult:
    grids: list[Image.Image]  #: one per Z value
    sheet: Image.Image  #: the grids side by side (the only grid when Z has one value)
    cells: list[Cell]
    infotext: str  #: the first cell's, as A1111 stores with the grid


def _nothing() -> Axis:
    return Axis(AXES["nothing"], (None,))


def run_xyz(
    generate: Generate,
    base: GenerationRequest,
    x: Axis,
    y: Axis | None = None,
    z: Axis | None = None,
) -> XYZResult:
    """Generate every combination of the axes' values and lay the images out in grids."""
    import secrets

    y, z = y or _nothing(), z or _nothing()
    if base.seed == -1 and "Seed" not in (x.type.name, y.type.name, z.type.name):
        base = replace(base, seed=secrets.randbelow(2**32))
    axes = (x, y, z)
    order = sorted(range(3), key=lambda i: not axes[i].type.model)  # model axes outermost
    shape = (len(x.values), len(y.values), len(z.values))
    combos: list[tuple[int, int, int]] = []

    def walk(depth: int, idx: list[int]) -> None:
        if depth == 3:
            combos.append((idx[0], idx[1], idx[2]))
            return
        a = order[depth]
        for v in range(shape[a]):
            idx[a] = v
            walk(depth + 1, idx)

    walk(0, [0, 0, 0])
    cells: dict[tuple[int, int, int], Cell] = {}
    for xi, yi, zi in combos:
        request, model = base, None
        for axis, i in ((x, xi), (y, yi), (z, zi)):
            value = axis.values[i]
            if axis.type.model:
                model = value
            request = axis.type.apply(request, value)
        result = generate(request, model)
        cells[(xi, yi, zi)] = Cell(xi, yi, zi, result.images[0], result.infotexts[0])
    grids = []
    for zi in range(shape[2]):
        rows = [[cells[(xi, yi, zi)].image for xi in range(shape[0])] for yi in range(shape[1])]
        title = z.labels()[zi] if shape[2] > 1 else ""
        grids.append(labelled_grid(rows, x.labels(), y.labels(), title=title))
    sheet = grids[0] if len(grids) == 1 else _side_by_side(grids)
    ordered = [cells[k] for k in sorted(cells, key=lambda k: (k[2], k[1], k[0]))]
    return XYZResult(grids, sheet, ordered, ordered[0].infotext)


def _side_by_side(images: list[Image.Image], gap: int = 16) -> Image.Image:
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    h = max(im.height for im in images)
    out = Image.new("RGB", (w, h), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out
