"""``emaki serve``: the web page and HTTP API over one loaded model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from emaki.pipelines.cli import add_model_args

    p = sub.add_parser(
        "serve",
        help="serve the web page, the A1111-compatible API and the job API",
        description=(
            "Binds 127.0.0.1 by default. Binding any other address needs --token (or "
            "$EMAKI_TOKEN); with a token every route but the page's files needs it."
        ),
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--token", help="auth token (default: $EMAKI_TOKEN, else none)")
    p.add_argument("--home", type=Path, help="folder for the job queue and outputs")
    p.add_argument("--models-dir", type=Path, help="models folder (LoRA, embeddings, VAE...)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from emaki.models.library import models_root
    from emaki.pipelines.cli import load_from_args
    from emaki.server.app import create_app
    from emaki.server.config import ServerConfig

    home = args.home or (args.models_dir or models_root()).parent / "server"
    config = ServerConfig(
        home=home, host=args.host, port=args.port, token=args.token or os.environ.get("EMAKI_TOKEN")
    )
    config.check_exposure()  # before loading anything
    pipeline = load_from_args(args)
    app = create_app(config, pipeline)
    print(f"emaki: serving on http://{args.host}:{args.port}/ (state in {home})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
