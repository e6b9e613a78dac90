"""`cifarlab serve`: trained runs behind an HTTP API and a web page."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cifarlab.cli.common import fmt

TOKEN_ENV = "CIFARLAB_SERVE_TOKEN"  # the same name as cifarlab.serve.TOKEN_ENV (that module needs fastapi)


# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "serve runs over HTTP: a JSON API and a web page to classify images"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help=HELP,
        **fmt(
            "Serve one or more runs on http://HOST:PORT/: a web page (drop, choose or paste an image; top-5\n"
            "classes, the Grad-CAM overlay, the model card), POST /v1/predict (multipart or raw image bytes),\n"
            "GET /v1/models, GET /healthz and the API description at /docs (/openapi.json). Concurrent\n"
            "requests are batched into one forward pass (--max-batch, --max-wait-ms). Listens on 127.0.0.1\n"
            f"only unless --host says otherwise; any other address needs a token (--token or ${TOKEN_ENV},\n"
            "sent as 'Authorization: Bearer TOKEN'). Needs: pip install 'cifarlab[serve]'.",
            "cifarlab serve runs/20260101-120000-fast --port 8000",
        ),
    )
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders (the first is the default)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' on /v1/* (default: ${TOKEN_ENV}; prefer the variable: "
        "a command-line argument is visible to other users in the process list)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="most images per forward pass and per request (64)")
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a forward pass waits for more requests (5 ms)"
    )
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="torch (default) or onnx runtime")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body in MiB (default: 32)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a request may take (default: 10)")
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="close a connection that has not sent a whole request line and headers this many seconds after it "
        "opened or after its last response (default: 10; idle and trickling clients cannot pile up)",
    )
    p.set_defaults(func=cmd_serve)


def _upload_bytes(mb: float) -> int:
    from cifarlab.errors import UserError

    if not 0 < mb < 2**20:  # nan and inf fail this too
        raise UserError(f"--max-upload-mb {mb}: give a number of MiB above 0 (and below 2**20)")
    return int(mb * 2**20)


def cmd_serve(args: argparse.Namespace) -> int:
    from cifarlab.errors import UserError

    try:
        from cifarlab.serve import serve
    except ImportError as e:
        raise UserError(f"cifarlab serve needs FastAPI and uvicorn ({e}): pip install 'cifarlab[serve]'") from None
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be 1..65535")
    serve(
        args.run_dirs,
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=_upload_bytes(args.max_upload_mb),
        timeout_s=args.timeout,
        header_timeout_s=args.header_timeout,
        backend=args.backend,
        device=args.device,
    )
    return 0
