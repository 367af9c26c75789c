"""The default model's card, written from the records the build left: dataset, runs and scores.

Every figure in the card comes from a file: ``dataset.json`` (sources, licenses, counts), each
run's ``recipe.toml`` and ``log.csv`` (steps, wall time, throughput), and the JSON of
``emaki eval``. Nothing is typed in by hand except the prose around them.
"""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path
from typing import Any

from emaki.eval.run import markdown_table


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Steps done, wall-clock seconds summed over every (resumed) part of a run, last loss."""
    rows = list(csv.DictReader((Path(run_dir) / "log.csv").open()))
    seconds = 0.0
    prev = 0.0
    for r in rows:
        e = float(r["elapsed_s"])
        if e < prev:  # a resumed part starts its clock again
            seconds += prev
        prev = e
    seconds += prev
    return {
        "run": str(run_dir),
        "steps": int(rows[-1]["step"]) if rows else 0,
        "hours": round(seconds / 3600, 2),
        "last_loss": float(rows[-1]["loss"]) if rows else None,
        "recipe": (Path(run_dir) / "recipe.toml").read_text(),
    }


def summaries_from_card(card: str) -> dict[str, dict[str, Any]]:
    """The run summaries an earlier card recorded (its training table and recipe blocks).

    A shipped model continued by a later run keeps the records of the parts trained before:
    their run folders are gone with the machine that ran them, the card they wrote is not.
    """
    out: dict[str, dict[str, Any]] = {}
    lines = card.splitlines()
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].isdigit():
            name, steps, hours, loss = cells
            out[name] = {
                "run": None,
                "steps": int(steps),
                "hours": float(hours),
                "last_loss": None if loss == "None" else float(loss),
                "recipe": "",
            }
    for i, line in enumerate(lines):
        name = line.removeprefix("### Recipe: ")
        if name != line and name in out and i + 2 < len(lines) and lines[i + 2] == "```toml":
            end = lines.index("```", i + 3)
            out[name]["recipe"] = "\n".join(lines[i + 3 : end])
    return out


def model_card(
    *,
    title: str,
    dataset: Path,
    runs: dict[str, Path | dict[str, Any]],
    eval_json: Path | None,
    text_choice: str,
    hardware: str | None = None,
    contact_sheet: str | None = None,
    notes: str = "",
) -> str:
    """The card's Markdown. ``runs`` maps each part's name to its run folder, or to a summary
    (``run_summary``'s dict) kept from an earlier card by ``summaries_from_card``."""
    info = json.loads((Path(dataset) / "dataset.json").read_text())
    lines = [f"# {title}", ""]
    lines += [
        "A small latent-diffusion model trained from scratch by emaki's own recipes, on openly",
        "licensed emoji artwork only. It ships with emaki so that a fresh install generates",
        "without downloading anything.",
        "",
        "## Data",
        "",
        f"{info['images']} images ({info['size']} px renders), built by `emaki data build` "
        f"(skin tones: {info['skin_tones']}; {info['duplicates_removed']} pixel-identical duplicates removed).",
        "",
        "| source | package | version | license | images | attribution |",
        "|---|---|---|---|---|---|",
    ]
    for s in info["sources"]:
        lines.append(
            f"| {s['key']} | {s['package']} | {s['version']} | {s['license']} | {s['images']} | {s['attribution']} |"
        )
    lines += ["", "Captions: CLDR names and emojilib keywords (MIT), plus the source's style.", ""]
    lines += [
        "## Training",
        "",
        f"Hardware: {hardware or platform.processor() or platform.machine()}.",
        "",
    ]
    lines += [
        "| part | steps (last logged) | hours of training steps (set-up and caching excluded) | final loss |",
        "|---|---|---|---|",
    ]
    summaries = {
        name: run if isinstance(run, dict) else run_summary(run) for name, run in runs.items()
    }
    total = 0.0
    for name, s in summaries.items():
        total += s["hours"]
        lines.append(f"| {name} | {s['steps']} | {s['hours']} | {s['last_loss']} |")
    lines += ["", f"Total: {total:.1f} hours.", "", "### Text encoder", "", text_choice, ""]
    for name, s in summaries.items():
        if not s["recipe"]:
            continue
        lines += [f"### Recipe: {name}", "", "```toml", s["recipe"].strip(), "```", ""]
    if eval_json is not None:
        result = json.loads(Path(eval_json).read_text())
        lines += [
            "## Measured quality",
            "",
            f"`emaki eval`, {result['prompts']} prompts, CFG {result['cfg']}:",
            "",
        ]
        lines.append(markdown_table(result))
    if contact_sheet:
        lines += ["## Contact sheet", "", f"![64 prompts]({contact_sheet})", ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    return "\n".join(lines)
