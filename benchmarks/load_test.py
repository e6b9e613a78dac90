"""Load test for `cifarlab serve`: throughput and latency at several concurrency levels, beside the bare loop.

Starts the service (uvicorn in a subprocess on 127.0.0.1, a free port) for RUN_DIR with the given backend,
sends a fixed number of single-image requests (raw PNG bytes, ``preview=false``) at each concurrency level
from a bounded pool of client threads (httpx2, one connection per thread), stops the server, and reports
throughput (images/s), p50/p95/p99 latency and the error count per level, next to the bare batched predict
loop (`inference.predict_proba` on the same decoded images at batch 64) in this process.

    python benchmarks/load_test.py runs/20260101-120000-fast --backend torch --requests 400 \\
        --concurrency 1 4 16 64 --json benchmarks/results/serve_torch.json

Run it once per backend to compare them (`--backend onnx`). Images are CIFAR-like 32x32 PNGs: from
``--images DIR`` (first N image files) or generated (seeded noise with structure).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

SERVER = """
import sys, uvicorn
from cifarlab.serve import create_app
from cifarlab.serve_protocol import header_deadline_protocol
app = create_app([sys.argv[1]], backend=sys.argv[2], max_batch=int(sys.argv[4]), max_wait_ms=float(sys.argv[5]),
                 device=sys.argv[6])
header_timeout = float(sys.argv[7])  # as `cifarlab serve --header-timeout`; 0: uvicorn's own protocol
http = header_deadline_protocol(header_timeout) if header_timeout > 0 else "auto"
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning", backlog=1024, http=http)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_images(n: int, folder: Path | None) -> list[bytes]:
    from PIL import Image

    if folder is not None:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:n]
        if files:
            return [p.read_bytes() for p in files]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:32, 0:32]
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy) * 4 % 256], -1)
        a = (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def bare_loop(run_dir: str, images: list[bytes], backend: str, device: str, repeats: int) -> dict[str, Any]:
    """predict_proba (or the ONNX session) on the decoded images at batch 64: the ceiling without HTTP."""
    import torch

    from cifarlab.serve import decode, load_model

    entry = load_model(run_dir, backend=backend, device=device)
    x = torch.from_numpy(np.stack([decode(b, "img", entry.input_shape, 40_000_000) for b in images]))
    entry.batcher.forward(x[:64])  # warm-up
    t = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for i in range(0, len(x), 64):
            entry.batcher.forward(x[i : i + 64])
            n += len(x[i : i + 64])
    dt = time.perf_counter() - t
    entry.batcher.close()
    return {"images": n, "seconds": dt, "images_per_s": n / dt}


def run_level(url: str, images: list[bytes], n_requests: int, concurrency: int, timeout: float) -> dict[str, Any]:
    import httpx2 as httpx

    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def client() -> httpx.Client:
        c = getattr(local, "client", None)
        if c is None:
            c = httpx.Client(timeout=timeout)
            local.client = c
            with lock:
                clients.append(c)
        return c

    def one(i: int) -> tuple[float, bool]:
        t = time.perf_counter()
        try:
            r = client().post(url, content=images[i % len(images)], headers={"Content-Type": "image/png"})
            ok = r.status_code == 200
        except Exception:  # noqa: BLE001 (counted as an error)
            ok = False
        return time.perf_counter() - t, ok

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(min(concurrency, n_requests))))  # warm the connections
        t = time.perf_counter()
        results = list(pool.map(one, range(n_requests)))
        wall = time.perf_counter() - t
    for c in clients:
        c.close()
    lat = np.array([r[0] for r in results if r[1]]) * 1000
    errors = sum(not r[1] for r in results)
    pct = {f"p{q}_ms": float(np.percentile(lat, q)) if len(lat) else None for q in (50, 95, 99)}
    return {
        "concurrency": concurrency,
        "requests": n_requests,
        "errors": errors,
        "seconds": wall,
        "images_per_s": (n_requests - errors) / wall,
        **pct,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run folder")
    ap.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    ap.add_argument("--requests", type=int, default=400, help="requests per concurrency level (400)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=Path, default=None, help="a folder of test images (default: generated)")
    ap.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    ap.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="the server's header deadline, as `cifarlab serve` (10); 0 runs uvicorn's own protocol, to compare",
    )
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results as JSON")
    args = ap.parse_args(argv)

    images = make_images(256, args.images)
    bare = bare_loop(args.run_dir, images, args.backend, args.device, repeats=max(1, args.requests // len(images)))
    print(f"bare loop ({args.backend}, batch 64): {bare['images_per_s']:.0f} images/s")

    port = free_port()
    with tempfile.TemporaryFile() as log:
        cmd = [sys.executable, "-c", SERVER, args.run_dir, args.backend, str(port), str(args.max_batch)]
        cmd += [str(args.max_wait_ms), args.device, str(args.header_timeout)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            import httpx2 as httpx

            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 60
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    print(log.read().decode(errors="replace"), file=sys.stderr)
                    return 1
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline:
                    print("the server did not start within 60 s", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            url = f"{base}/v1/predict?preview=false&top_k=5"
            levels = []
            print(f"{'conc':>5} {'req':>5} {'err':>4} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
            for c in args.concurrency:
                r = run_level(url, images, args.requests, c, args.timeout)
                levels.append(r)
                print(
                    f"{c:>5} {r['requests']:>5} {r['errors']:>4} {r['images_per_s']:>8.1f} "
                    + " ".join(
                        f"{r[k]:>8.1f}" if r[k] is not None else f"{'-':>8}" for k in ("p50_ms", "p95_ms", "p99_ms")
                    )
                )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    out = {
        "run": str(args.run_dir),
        "backend": args.backend,
        "device": args.device,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "cpu_count": os.cpu_count(),
        "bare_loop": bare,
        "levels": levels,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(r["errors"] == 0 for r in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
