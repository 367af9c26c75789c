"""``emaki merge`` (A1111's checkpoint merger) and ``emaki models`` (list the models folder).

``register(sub)`` adds both sub-commands to the main parser; ``run_merge`` / ``run_models`` run
them. Model arguments are paths, or names in the models folder (``checkpoints/`` for models,
``vae/`` for ``--vae``) as :func:`emaki.models.library.find_model` resolves them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emaki.errors import ModelLoadError

#: CLI method names -> MergeSpec methods (A1111's labels in the help).
METHOD_FLAGS = {
    "weighted-sum": "weighted_sum",
    "add-difference": "add_difference",
    "none": "no_interpolation",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``merge`` and ``models`` sub-commands."""
    _register_merge(sub)
    _register_models(sub)


def _register_merge(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "merge",
        help="merge checkpoints (A1111's Checkpoint Merger)",
        description=(
            "Merge SD 1.x/2.x checkpoints (single files or diffusers folders, or names in the "
            "models folder's checkpoints/) into one .safetensors file. Methods, as A1111 names "
            "them: 'Weighted sum' (weighted-sum) = (1-alpha)*A + alpha*B; 'Add difference' "
            "(add-difference) = A + alpha*(B-C); 'No interpolation' (none) = A, to bake in a VAE, "
            "save as fp16 or discard weights. An inpainting model must be A."
        ),
    )
    m.add_argument("a", metavar="A", help="primary model")
    m.add_argument("b", metavar="B", nargs="?", help="secondary model")
    m.add_argument("c", metavar="C", nargs="?", help="tertiary model (add-difference)")
    m.add_argument(
        "--method",
        choices=list(METHOD_FLAGS),
        default="weighted-sum",
        help="weighted-sum ('Weighted sum', default), add-difference ('Add difference'), "
        "none ('No interpolation')",
    )
    m.add_argument("--alpha", type=float, default=0.3, help="multiplier alpha (A1111 default 0.3)")
    m.add_argument("--vae", help="bake in this VAE (file, diffusers VAE folder, or vae/ name)")
    precision = m.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="save every weight as fp16")
    precision.add_argument("--fp32", action="store_true", help="save every weight as fp32")
    m.add_argument("--discard", metavar="REGEX", help="drop the weights whose key matches REGEX")
    m.add_argument("-o", "--out", type=Path, required=True, help="output .safetensors file")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    m.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .ckpt/.pt/.bin inputs (loaded with torch.load(weights_only=True))",
    )


def _register_models(sub: argparse._SubParsersAction) -> None:
    from emaki.models.library import KINDS

    m = sub.add_parser(
        "models",
        help="list the models folder",
        description=(
            "Lists the models under the models folder ($EMAKI_MODELS, else $EMAKI_HOME/models, "
            "else ~/.local/share/emaki/models): " + ", ".join(f"{k}/" for k in KINDS) + "."
        ),
    )
    m.add_argument("kind", nargs="?", choices=list(KINDS), help="list only this kind")
    m.add_argument("--root", type=Path, help="models folder (default: see above)")
    m.add_argument("--json", action="store_true", help="print as JSON")
    m.add_argument("--hashes", action="store_true", help="also show short SHA-256 hashes")


def run_merge(args: argparse.Namespace) -> int:
    """Run ``emaki merge``: print the written file's path."""
    from emaki.models.merge import MergeSpec, merge_checkpoints

    spec = MergeSpec(
        method=METHOD_FLAGS[args.method],  # type: ignore[arg-type]
        alpha=args.alpha,
        a=_model_path(args.a, "checkpoints"),
        b=_model_path(args.b, "checkpoints") if args.b else None,
        c=_model_path(args.c, "checkpoints") if args.c else None,
        bake_vae=_model_path(args.vae, "vae") if args.vae else None,
        dtype="fp16" if args.fp16 else "fp32" if args.fp32 else "keep",
        discard=args.discard,
    )
    out = merge_checkpoints(
        spec, args.out, overwrite=args.overwrite, allow_pickle=args.allow_pickle
    )
    print(out)
    return 0


def _model_path(text: str, kind: str) -> Path:
    """An existing path as given, else the model of that name in the models folder."""
    from emaki.models.library import find_model

    path = Path(text).expanduser()
    if path.exists():
        return path
    if path.is_absolute() or ".." in text:
        raise ModelLoadError(f"{text}: no such file or folder")
    try:
        return find_model(kind, text).path
    except ModelLoadError as exc:
        raise ModelLoadError(f"{text}: no such file or folder, and {exc}") from None


def run_models(args: argparse.Namespace) -> int:
    """Run ``emaki models``: the folder's models by kind, as text or JSON."""
    from emaki.models.library import KINDS, list_models, models_root, short_hash12

    root = args.root if args.root is not None else models_root()
    kinds = [args.kind] if args.kind else list(KINDS)
    listing = {kind: list_models(kind, root) for kind in kinds}
    hashes = {
        entry.path: short_hash12(entry.path, root)
        for entries in listing.values()
        for entry in entries
        if args.hashes
    }
    if args.json:
        rows = [
            {
                "kind": e.kind,
                "name": e.name,
                "path": str(e.path),
                "size": e.size,
                **({"hash": hashes[e.path]} if args.hashes else {}),
            }
            for entries in listing.values()
            for e in entries
        ]
        print(json.dumps({"root": str(root), "models": rows}, indent=2))
        return 0
    print(f"models folder: {root}")
    for kind, entries in listing.items():
        print(f"{kind}/ ({len(entries)})")
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            extra = f"  {hashes[e.path]}" if args.hashes else ""
            print(f"  {e.name:<{width}}  {_human_size(e.size):>9}{extra}")
    return 0


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # unreachable
