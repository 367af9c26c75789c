"""``emaki prompt TEXT``: show how a prompt is parsed, scheduled and chunked.

Prints what generation will do with the prompt: the extra-network tags taken out, each ``AND``
part with its weight, the prompt-editing schedule (which text holds at which steps, 1-based as
in progress bars), each text's emphasis pieces and its token count per chunk ("12/75"). Token
counts need the model's tokenizer (the default model's unless ``--model`` is given) and the
models folder's textual-inversion embeddings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prompt",
        help="show how a prompt is parsed: emphasis, editing schedule, AND parts, tokens",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("text", help="the prompt")
    p.add_argument("--negative", default="", help="a negative prompt to show too")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--model", type=Path, help="the model whose tokenizer counts tokens")
    p.add_argument("--models-dir", type=Path, help="models folder (for embeddings)")
    p.add_argument(
        "--emphasis",
        default="Original",
        help="Original, No norm, Ignore or None (default Original)",
    )
    p.add_argument("--json", action="store_true", help="print as JSON")


def describe(
    text: str, negative: str, steps: int, encoder: Any | None = None, emphasis: str = "Original"
) -> dict[str, Any]:
    """The parse of a prompt and a negative prompt as plain data (what the command prints).

    ``encoder`` is a :class:`~emaki.text.encoder.TextEncoder`; without it token counts are left
    out.
    """
    from emaki.prompts.encode import _pieces
    from emaki.prompts.grammar import parse_prompt, prompt_schedule, strip_comments

    parsed = parse_prompt(text, steps)

    def texts(schedule: Any) -> list[dict[str, Any]]:
        out = []
        first = 1
        for end, t in schedule:
            last = min(end + 1, steps)
            if first > last:
                continue  # A1111's `step <= end` rule never reaches a last entry ending at `steps`
            pieces = _pieces(t, emphasis)
            item: dict[str, Any] = {"steps": [first, last], "text": t, "pieces": pieces}
            if encoder is not None:
                chunks = encoder.tokenize_weighted(pieces)
                item["tokens"] = chunks.token_count
                item["chunks"] = len(chunks.ids)
                item["limit"] = len(chunks.ids) * encoder.chunk_tokens
                item["embeddings"] = list(chunks.embeddings)
            out.append(item)
            first = last + 1
        return out

    return {
        "prompt": parsed.text,
        "extra_networks": [
            {"kind": c.kind, "name": c.name, "args": list(c.positional), "named": dict(c.named)}
            for c in parsed.extra_networks
        ],
        "parts": [{"weight": w, "schedule": texts(s)} for w, s in parsed.parts],
        "negative": texts(prompt_schedule(strip_comments(negative), steps)),
    }


def run(args: argparse.Namespace) -> int:
    from emaki.request import GenerationRequest

    GenerationRequest(prompt=args.text, steps=args.steps, emphasis=args.emphasis).validate()
    pipe = _pipeline(args)
    library = pipe.embedding_library()
    info = describe(args.text, args.negative, args.steps, pipe.text, args.emphasis)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"prompt: {info['prompt']}")
    for call in info["extra_networks"]:
        args_text = ":".join([*call["args"], *(f"{k}={v}" for k, v in call["named"].items())])
        print(
            f"extra network: <{call['kind']}:{call['name']}{':' if args_text else ''}{args_text}>"
        )
    many = len(info["parts"]) > 1
    for i, part in enumerate(info["parts"], 1):
        if many:
            print(f"AND part {i}, weight {part['weight']:g}:")
        _print_schedule(part["schedule"], "  " if many else "")
    if args.negative:
        print("negative:")
        _print_schedule(info["negative"], "  ")
    if library is not None:
        print(f"embeddings available: {', '.join(library.names())}")
    return 0


def _print_schedule(schedule: list[dict[str, Any]], indent: str) -> None:
    for item in schedule:
        lo, hi = item["steps"]
        span = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
        tokens = f"  [{item['tokens']}/{item['limit']} tokens]" if "tokens" in item else ""
        print(f"{indent}{span}: {item['text']!r}{tokens}")
        weighted = [(t, w) for t, w in item["pieces"] if w != 1.0]
        if weighted:
            print(f"{indent}  weights: " + ", ".join(f"{t!r} x{w:.4g}" for t, w in weighted))
        if item.get("embeddings"):
            print(f"{indent}  embeddings: {', '.join(item['embeddings'])}")


def _pipeline(args: argparse.Namespace) -> Any:
    from emaki.models.default import default_model_path
    from emaki.pipelines.txt2img import load_pipeline

    return load_pipeline(args.model or default_model_path(), models=args.models_dir)
