"""`cifarlab serve`: trained runs behind an HTTP API and a web page (FastAPI; extra `cifarlab[serve]`).

Endpoints (every error is JSON ``{"error": "..."}`` with a 4xx/5xx status):

- ``GET /`` the web page (one self-contained HTML file: no external requests), ``GET /healthz``;
- ``GET /v1/models``, ``GET /v1/models/{id}``: model cards (recipe, dataset, classes, input shape, test
  accuracy, per-class recall, confused pairs, report link); ``GET /v1/models/{id}/report`` (and its
  ``plots/``) serves the run's report.html;
- ``POST /v1/predict?model=ID&top_k=5&saliency=false&preview=true``: multipart (fields ``file`` / ``files``,
  one or many) or raw image bytes; per image the top-k classes, the image as the model sees it and, on
  request, the Grad-CAM overlay of the top class;
- ``GET /docs``: a local page listing the OpenAPI operations (FastAPI's Swagger UI loads its assets from a
  CDN, which this service never relies on) and ``GET /openapi.json``.

Uploads are decided by their bytes (Pillow must identify a raster format; SVG/XML/text are refused with 415),
never by name or declared type; size is capped while reading; decompression bombs are refused from the header.
Images are decoded exactly like `cifarlab predict` (`cifarlab.predict._decode`; a damaged or truncated one is 400
with predict's message) and classified with the same `inference.predict_proba` call, so a file gives the same
probabilities through both. The ONNX backend runs an export with the recipe's TTA in the graph: the same views.

Concurrent requests are micro-batched: one asyncio queue per model, a worker gathers up to `max_batch`
images or waits at most `max_wait_ms`, then runs one forward pass in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hmac
import io
import ipaddress
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Receive, Scope, Send

# One list of formats for the service, `predict` and dataset loading.
from cifarlab.data.images import FORMAT_NAMES, image_formats
from cifarlab.errors import UserError
from cifarlab.runs import stale_result

__all__ = [
    "BACKENDS",
    "TOKEN_ENV",
    "MicroBatcher",
    "ServedModel",
    "ServeError",
    "check_bind",
    "create_app",
    "is_loopback",
    "load_model",
]

BACKENDS = ("torch", "onnx")
TOKEN_ENV = "CIFARLAB_SERVE_TOKEN"
PREVIEW_SIDE = 256  # the preview and the saliency overlay are upscaled (nearest) to about this many pixels
REPORT_CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class ServeError(Exception):
    """An answer to the client: HTTP `status` and a message saying what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _TooLarge(Exception):
    pass


# -- binding -------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); any other name or address is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def clean_token(token: str | None) -> str | None:
    """The bearer token as compared: stripped as the client's is ("abc " must not lock everyone out); a blank
    one is none."""
    return (token or "").strip() or None


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the service beyond this machine without a bearer token (a blank one is none)."""
    if not is_loopback(host) and clean_token(token) is None:
        raise UserError(
            f"refusing to listen on {host} without a token: anyone who can reach this address could use the "
            f"service. Set ${TOKEN_ENV} (or --token) to require 'Authorization: Bearer <token>', or bind "
            "127.0.0.1 (the default)"
        )


# -- micro-batching ------------------------------------------------------------------------------------------


class MicroBatcher:
    """Gathers images from concurrent requests into one forward pass.

    `submit(x)` queues a uint8 (n, C, H, W) tensor and waits for its (n, classes) probabilities. A worker task
    takes the first waiting request, then collects more until `max_batch` images are gathered or `max_wait_s`
    has passed, and runs `forward` once on their concatenation in its own thread (one pass at a time per
    model). The worker starts on first use in the running event loop (and again if the loop changes).
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_s: float) -> None:
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.passes = 0  # forward passes run
        self.images = 0  # images classified
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cifarlab-forward")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]] | None = None
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> tuple[asyncio.Queue[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]], asyncio.Event]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done() or self._queue is None:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._event = asyncio.Event()
            self._task = loop.create_task(self._worker(self._queue, self._event))
        assert self._event is not None
        return self._queue, self._event

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        queue, event = self._start()
        fut: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        queue.put_nowait((x, fut))
        event.set()
        return await fut

    async def _gather(
        self,
        queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]],
        event: asyncio.Event,
        first: tuple[torch.Tensor, asyncio.Future[torch.Tensor]],
    ) -> tuple[list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]], Any]:
        loop = asyncio.get_running_loop()
        items = [first]
        n = len(first[0])
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                event.clear()
                if not queue.empty():
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            if n + len(item[0]) > self.max_batch:
                return items, item  # the next pass starts with it
            items.append(item)
            n += len(item[0])
        return items, None

    async def _worker(
        self, queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]], event: asyncio.Event
    ) -> None:
        loop = asyncio.get_running_loop()
        carry = None
        while True:
            first = carry if carry is not None else await queue.get()
            items, carry = await self._gather(queue, event, first)
            items = [(x, f) for x, f in items if not f.done()]  # timed-out requests are not computed
            if not items:
                continue
            batch = torch.cat([x for x, _ in items]) if len(items) > 1 else items[0][0]
            try:
                probs = await loop.run_in_executor(self._executor, self.forward, batch)
            except Exception as exc:  # noqa: BLE001 (every waiting request gets the error)
                for _, f in items:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.passes += 1
            self.images += len(batch)
            start = 0
            for x, f in items:
                if not f.done():
                    f.set_result(probs[start : start + len(x)])
                start += len(x)

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


# -- models --------------------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """One served run: its card, the forward function the batcher calls, and a model copy for saliency."""

    id: str
    path: Path
    classes: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float] | None
    std: list[float] | None
    backend: str
    card: dict[str, Any]
    batcher: MicroBatcher
    saliency_model: torch.nn.Module
    saliency_lock: threading.Lock = field(default_factory=threading.Lock)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None  # a damaged optional file only leaves the card without its numbers


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _card_loss(metrics: dict[str, Any], ev: dict[str, Any], temperature: float) -> float | None:
    """The test loss at the temperature the service applies: the evaluation's when it was made at that
    temperature, else training's when it says it was (an older metrics.json's `test_loss` is the plain
    softmax's; its calibrated one is in "calibration"); None when no file knows it."""
    inference: dict[str, Any] = ev["inference"] if isinstance(ev.get("inference"), dict) else {}
    if inference.get("temperature", 1.0) == temperature and _finite(ev.get("loss")) is not None:
        return _finite(ev.get("loss"))
    cal: dict[str, Any] = metrics["calibration"] if isinstance(metrics.get("calibration"), dict) else {}
    if temperature != 1.0:
        return _finite(cal.get("test_loss")) if cal.get("temperature") == temperature else None
    plain = metrics.get("test_loss_uncalibrated")  # None or absent: training had no temperature either
    return _finite(plain if plain is not None else metrics.get("test_loss"))


def model_card(run: Any, model_id: str, backend: str, tta: str) -> dict[str, Any]:
    """What /v1/models says about a run: from config.json, metrics.json and eval_test.json when present."""
    try:
        metrics = run.metrics
    except UserError:  # a damaged metrics.json costs the card its figures, not the service
        metrics = {}
    ev = _read_json(run.path / "eval_test.json")
    if not isinstance(ev, dict) or stale_result(run.path, ev, run.path / "eval_test.json"):  # of earlier weights
        ev = metrics.get("evaluation") if isinstance(metrics.get("evaluation"), dict) else {}
    acc = _finite(metrics.get("test_accuracy"))
    if acc is None:
        acc = _finite(ev.get("accuracy"))
    per_class = ev.get("per_class") if isinstance(ev.get("per_class"), dict) else {}
    recall = {str(k): _finite(v.get("recall")) for k, v in per_class.items() if isinstance(v, dict)}
    pairs = []
    for p in ev.get("confused_pairs") or []:
        if isinstance(p, dict) and {"a", "b", "count"} <= set(p):
            pairs.append({k: p[k] for k in ("a", "b", "count", "a_to_b", "b_to_a") if k in p})
    dataset = run.config.get("dataset") or {}
    has_report = (run.path / "report.html").is_file()
    inference = ev.get("inference") if isinstance(ev.get("inference"), dict) else {}
    measured = str(inference.get("tta") or run.recipe.tta)
    # The figures are the run's evaluation: with its TTA. Both backends run the recipe's TTA (the ONNX graph holds
    # it); where the evaluation was made with other views, the service answers a little differently: say so.
    note = (
        f"test figures measured with TTA {measured}; this backend runs TTA {tta}, so its own accuracy and "
        "probabilities differ a little"
        if measured != tta
        else None
    )
    return {
        "id": model_id,
        "recipe": run.recipe.name,
        "architecture": run.recipe.model,
        "dataset": dataset.get("name"),
        "classes": run.classes,
        "input_shape": list(run.input_shape),
        "backend": backend,
        "tta": tta,
        "temperature": run.temperature,  # the softmax temperature the probabilities are at (`cifarlab.calibrate`)
        "test_accuracy": acc,
        "test_loss": _card_loss(metrics, ev, run.temperature),
        "test_figures_tta": measured,
        "note": note,
        "per_class_recall": recall or None,
        "confused_pairs": pairs[:5],
        "report": f"/v1/models/{model_id}/report" if has_report else None,
    }


def _onnx_forward(run: Any, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """An onnxruntime session on the run's model.onnx, exported to a temporary file first when it is absent, or
    when it is not this run's export or not with the recipe's TTA (as the torch backend runs it)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--backend onnx needs onnxruntime: pip install 'cifarlab[export]' onnxruntime") from None
    from cifarlab.export import INPUT_NAME, export_onnx, weights_digest

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    path = run.path / "model.onnx"
    session = None
    if path.is_file():
        session = ort.InferenceSession(str(path), providers=providers)
        meta = session.get_modelmeta().custom_metadata_map
        # Exports before the TTA went into the graph say "none" (and have no other value).
        if (
            meta.get("class_names") != json.dumps(run.classes)
            or meta.get("weights_sha256") != weights_digest(run)
            or meta.get("tta", "none") != run.recipe.tta
        ):
            # A foreign or stale file (other weights, exported before; or `export --tta` with other views than
            # the recipe's, which would answer differently from the torch backend): export a fresh one, the file
            # is left as it is.
            session = None
    if session is None:
        with tempfile.TemporaryDirectory(prefix="cifarlab-serve-") as tmp:
            onnx_path = export_onnx(run.path, Path(tmp) / "model.onnx", tta=run.recipe.tta)
            session = ort.InferenceSession(str(onnx_path), providers=providers)  # reads the file: it may go

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])

    return forward


def load_model(
    run_dir: Path | str,
    *,
    backend: str = "torch",
    device: str | None = None,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    model_id: str | None = None,
) -> ServedModel:
    """Load a run for serving; a run whose weights are missing, damaged or not finite is refused (UserError)."""
    from cifarlab.inference import recipe_options, resolve_device
    from cifarlab.runs import load_run

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    run = load_run(run_dir)
    c, h, w = run.input_shape
    if h != w or c not in (1, 3):
        raise UserError(f"{run.path}: the model takes {c}x{h}x{w} images; only square 1- or 3-channel models serve")
    model = run.build_model()  # refuses missing, mismatched or NaN/inf weights
    dev = resolve_device(device)
    model.to(dev)
    prec = run.recipe.precision
    if prec == "fp16" and dev.type != "cuda":
        prec = "auto"  # exactly what `cifarlab predict` does
    mean, std = run.normalization
    opts = {**recipe_options(run.recipe), "precision": prec, "temperature": run.temperature}
    saliency_model = copy.deepcopy(model).eval()
    mid = model_id or run.path.name

    def torch_forward(x: torch.Tensor) -> torch.Tensor:
        from cifarlab import inference  # looked up per call, so a test can wrap predict_proba

        return inference.predict_proba(model, x, mean=mean, std=std, device=dev, **opts)

    # Both backends run the recipe's TTA: the ONNX one on an export with it in the graph (`_onnx_forward`).
    forward = torch_forward if backend == "torch" else _onnx_forward(run, dev)
    tta = run.recipe.tta
    return ServedModel(
        id=mid,
        path=run.path,
        classes=run.classes,
        input_shape=run.input_shape,
        mean=mean,
        std=std,
        backend=backend,
        card=model_card(run, mid, backend, tta),
        batcher=MicroBatcher(forward, max_batch, max_wait_ms / 1000.0),
        saliency_model=saliency_model,
    )


# -- images --------------------------------------------------------------------------------------------------


def sniff(data: bytes, name: str, max_pixels: int) -> str:
    """The image format of `data`, decided from the bytes only; ServeError otherwise: 415 for bytes no accepted
    format claims, 400 for an image whose header is damaged or cut short (in `cifarlab predict`'s words), 413 for
    too many pixels."""
    from PIL import Image, UnidentifiedImageError

    from cifarlab.data.images import bomb_numbers, header_pixel_limit
    from cifarlab.predict import _error_message

    if not data:
        raise ServeError(400, f"{name}: empty: no image bytes were sent")
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] == b"<" or b"<svg" in data[:4096].lower():
        raise ServeError(415, f"{name}: SVG/XML/HTML text, not a raster image (send {FORMAT_NAMES})")
    try:
        with Image.open(io.BytesIO(data), formats=image_formats()) as im:
            pixels = im.width * im.height
            fmt = str(im.format)
    except Image.DecompressionBombError as e:  # Pillow's own limit, checked from the header
        pixels = bomb_numbers(e)[0]
        size = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
        raise ServeError(
            413, f"{name}: refused: {size}, over the {max_pixels:,}-pixel limit (possible decompression bomb)"
        ) from None
    except UnidentifiedImageError:  # no accepted format's signature: not an image (at least not one we read)
        raise ServeError(415, f"{name}: not an image this service reads (send {FORMAT_NAMES} bytes)") from None
    except (OSError, ValueError, SyntaxError) as e:
        # A format's signature matched, then its header could not be read: a damaged or truncated file, as
        # `cifarlab predict` says for the same bytes (its message, from the same exception).
        raise ServeError(400, f"{name}: {_error_message(e, max_pixels)}") from None
    limit = header_pixel_limit(fmt, max_pixels)  # a big JPEG decodes at reduced size; decode_image checks the rest
    if pixels > limit:
        jpeg = " for JPEGs" if limit != max_pixels else ""
        raise ServeError(
            413,
            f"{name}: refused: {pixels:,} pixels, over the {limit:,}-pixel limit{jpeg} (possible decompression bomb)",
        )
    return fmt


def decode(data: bytes, name: str, shape: tuple[int, int, int], max_pixels: int) -> np.ndarray:
    """uint8 (C, H, W) at the model's input size, exactly as `cifarlab predict` decodes the same file."""
    from cifarlab.predict import _decode, _error_message

    sniff(data, name, max_pixels)
    try:
        return _decode(data, max_pixels, shape, where=name)
    except Exception as exc:  # noqa: BLE001 (Pillow raises many types for damaged files)
        msg = _error_message(exc, max_pixels)
        status = 413 if msg.startswith("refused") else 400
        raise ServeError(status, f"{name}: {msg}") from None


def _png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _scale(side: int) -> int:
    return max(1, PREVIEW_SIDE // max(1, side))


def preview_png(chw: np.ndarray) -> bytes:
    """The image as the model sees it, upscaled with nearest neighbour so its pixels stay visible."""
    from PIL import Image

    hwc = chw.transpose(1, 2, 0)
    im = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    s = _scale(max(im.size))
    im = im.resize((im.width * s, im.height * s), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def saliency_urls(entry: ServedModel, x: torch.Tensor, targets: Sequence[int]) -> list[str]:
    """Grad-CAM overlays (data: PNG URLs) of `targets` for uint8 images `x`, on a private model copy."""
    from cifarlab.explain import overlay_png, saliency
    from cifarlab.inference import model_device

    with entry.saliency_lock:
        heat = saliency(
            entry.saliency_model,
            x,
            method="gradcam",
            target=torch.tensor(list(targets), dtype=torch.long),
            mean=entry.mean,
            std=entry.std,
            device=model_device(entry.saliency_model),
        )
    rgb = x if x.shape[1] == 3 else x.expand(-1, 3, -1, -1)
    return [_png_data_url(overlay_png(rgb[i], heat[i], scale=_scale(x.shape[-1]))) for i in range(len(x))]


# -- request bodies ------------------------------------------------------------------------------------------


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge
        yield chunk


def _too_large(limit: int) -> ServeError:
    return ServeError(413, f"request body over the {limit / 2**20:g} MiB limit: send smaller or fewer images")


async def read_images(request: Request, limit: int, max_files: int) -> list[tuple[str, bytes]]:
    """(name, bytes) per uploaded image: multipart fields `file`/`files`, or the raw body (any other type).
    The body is refused (413) as soon as it passes `limit` bytes: a declared Content-Length over it is
    refused before anything is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    ctype = request.headers.get("content-type", "").lower()
    stream = _limited(request.stream(), limit)
    try:
        if ctype.startswith("multipart/form-data"):
            parser = MultiPartParser(request.headers, stream, max_files=max_files, max_fields=32)
            try:
                form = await parser.parse()
            except MultiPartException as e:
                if "too many files" in str(e).lower():
                    raise ServeError(
                        413, f"too many files: at most {max_files} file parts per request, in any field"
                    ) from None
                raise ServeError(400, f"malformed multipart body ({e})") from None
            try:
                out: list[tuple[str, bytes]] = []
                for key, value in form.multi_items():
                    if key not in ("file", "files"):
                        continue
                    if isinstance(value, str):
                        raise ServeError(
                            400,
                            f"form field {key!r} must be a file upload, not text (a file part needs "
                            "Content-Disposition: form-data; name=...; filename=...; filename*= alone is read as text)",
                        )
                    out.append((value.filename or f"file {len(out) + 1}", await value.read()))
            finally:
                await form.close()
            if not out:
                raise ServeError(400, "no image in the form: upload files in a field named 'file' or 'files'")
            return out
        body = b"".join([chunk async for chunk in stream])
        return [("body", body)]
    except _TooLarge:
        raise _too_large(limit) from None


# -- the app -------------------------------------------------------------------------------------------------


def _host_name(authority: str) -> str:
    """'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1', 'http://127.0.0.1:8000' -> '127.0.0.1'."""
    authority = authority.split("://", 1)[-1].split("/", 1)[0]
    if authority.startswith("["):
        return authority[1 : authority.find("]")]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


class _Guard:
    """Pure ASGI middleware: bearer token on /v1/* (when set) and security headers on every response.

    `local_only` (a service without a token, on this machine only): a request must name this machine by a
    loopback name in its Host header, which stops DNS rebinding (a page elsewhere whose name resolves to
    127.0.0.1 reading the service), and a browser request from another origin (its Origin header) is refused,
    which stops other sites from using the service through a visitor's browser."""

    def __init__(self, app: ASGIApp, token: str | None, local_only: bool = False) -> None:
        self.app = app
        token = clean_token(token)
        self.token = token.encode() if token else None
        self.local_only = local_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.local_only:
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1")
            origin = headers.get(b"origin", b"").decode("latin-1")
            why = None
            if host and not is_loopback(_host_name(host)):
                why = f"this service answers requests to localhost or 127.0.0.1 only, not to {host!r}"
            elif origin and not is_loopback(_host_name(origin)):  # "null" too: sandboxed frames, file:// pages
                why = f"requests from other sites' pages ({origin}) are refused"
            if why:
                resp = JSONResponse({"error": f"{why}; to serve other names, set a token"}, status_code=403)
                await resp(scope, receive, send)
                return
        if self.token is not None and scope["path"].startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                msg = "missing bearer token" if not auth else "wrong bearer token"
                resp = JSONResponse(
                    {"error": f"{msg}: send 'Authorization: Bearer <token>'"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await resp(scope, receive, send)
                return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")):
                    if k not in names:
                        headers.append((k, v))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "bad parameters: " + "; ".join(parts)


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def create_app(
    run_dirs: Sequence[Path | str],
    *,
    token: str | None = None,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    max_upload_bytes: int = 32 * 2**20,  # a 48-61 MP phone or camera JPEG is 10-25 MB
    timeout_s: float = 10.0,
    backend: str = "torch",
    device: str | None = None,
    max_pixels: int | None = None,
    local_only: bool = False,
) -> FastAPI:
    """The service for `run_dirs` (the first is the default model). Models load now: a bad run is a
    UserError before anything listens. `local_only` (what `serve` sets without a token): answer only requests
    addressed to this machine by a loopback name, and no cross-site browser requests (see `_Guard`)."""
    from cifarlab import __version__
    from cifarlab.data.images import MAX_IMAGE_PIXELS
    from cifarlab.serve_page import docs_page, index_page

    if not run_dirs:
        raise UserError("give at least one run folder to serve")
    finite = all(math.isfinite(v) for v in (max_wait_ms, timeout_s))  # nan would time out every request at once
    if max_batch < 1 or max_wait_ms < 0 or max_upload_bytes < 1 or timeout_s <= 0 or not finite:
        raise UserError(
            "--max-batch must be >= 1, --max-wait-ms >= 0, the upload limit and timeout > 0, all finite numbers"
        )
    pixel_limit = max_pixels or MAX_IMAGE_PIXELS
    models: dict[str, ServedModel] = {}
    for d in run_dirs:
        name = Path(d).resolve().name
        if name in models:
            raise UserError(f"two runs are named {name!r}; serve runs whose folders have different names")
        models[name] = load_model(
            d, backend=backend, device=device, max_batch=max_batch, max_wait_ms=max_wait_ms, model_id=name
        )
    default_id = next(iter(models))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for m in models.values():
            m.batcher.close()

    app = FastAPI(
        title="cifarlab serve",
        version=__version__,
        description='Image classification with trained cifarlab runs. Errors are JSON {"error": "..."}.',
        docs_url=None,  # Swagger UI would load its JS/CSS from a CDN: /docs below is a local page instead
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.models = models
    app.add_middleware(_Guard, token=token, local_only=local_only)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        # A body too large or too slow is left unread: close the connection rather than parse the rest as a request.
        close = {"Connection": "close"} if exc.status in (413, 504) else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=close)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(exc).__name__}: {exc})"}, status_code=500)

    def get_model(model_id: str | None) -> ServedModel:
        mid = model_id or default_id  # `?model=` left empty means the default, as leaving it out does
        if mid not in models:
            raise ServeError(404, f"unknown model {mid!r}; served: {', '.join(models)}")
        return models[mid]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_page(FORMAT_NAMES), headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(), headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/healthz", summary="liveness: the service is up")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "models": len(models), "auth": token is not None}

    @app.get("/v1/models", summary="the served models and their cards")
    async def list_models() -> dict[str, Any]:
        return {"default": default_id, "models": [m.card for m in models.values()]}

    # HEAD too (monitoring probes with it), kept out of the OpenAPI schema, which lists each operation once.
    for path, endpoint in (("/", index), ("/healthz", healthz), ("/v1/models", list_models)):
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.get("/v1/models/{model_id}", summary="one model's card")
    async def one_model(model_id: str) -> dict[str, Any]:
        return get_model(model_id).card

    def report_file(model_id: str, rel: str) -> Path:
        m = get_model(model_id)
        path = m.path / rel
        if not path.is_file():
            raise ServeError(404, f"model {model_id!r} has no {rel} (run `cifarlab report {m.path}` to write it)")
        return path

    @app.get("/v1/models/{model_id}/report", response_class=HTMLResponse, summary="the run's report.html")
    async def report(model_id: str) -> Response:
        data = report_file(model_id, "report.html").read_bytes()
        return Response(data, media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": REPORT_CSP})

    @app.get("/v1/models/{model_id}/plots/{name}", summary="a figure of the run's report")
    async def plot(model_id: str, name: str) -> Response:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.png", name):
            raise ServeError(404, f"no plot named {name!r}")
        return Response(report_file(model_id, f"plots/{name}").read_bytes(), media_type="image/png")

    @app.post(
        "/v1/predict",
        summary="classify one or more images",
        description="Multipart upload (fields `file` or `files`, one or many) or raw image bytes (any "
        "Content-Type but multipart, e.g. image/jpeg). The format is decided from the bytes.",
        openapi_extra=PREDICT_BODY,
    )
    async def predict(
        request: Request,
        model: str | None = Query(None, description="model id (a run folder name); default: the first served"),
        top_k: int = Query(5, ge=1, le=1000, description="classes per image"),
        saliency: bool = Query(False, description="add the Grad-CAM overlay of the top class (slower)"),
        preview: bool = Query(True, description="add the image as the model sees it"),
    ) -> dict[str, Any]:
        entry = get_model(model)
        try:
            return await asyncio.wait_for(_predict(request, entry, top_k, saliency, preview), timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(
                504, f"the request took longer than {timeout_s:g} s; retry, or send fewer images"
            ) from None

    async def _predict(
        request: Request, entry: ServedModel, top_k: int, want_saliency: bool, want_preview: bool
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        blobs = await read_images(request, max_upload_bytes, max_batch)
        if len(blobs) > max_batch:
            raise ServeError(413, f"too many images: at most {max_batch} per request")

        def decode_all() -> list[np.ndarray]:
            return [decode(data, name, entry.input_shape, pixel_limit) for name, data in blobs]

        arrays = await loop.run_in_executor(None, decode_all)
        x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
        probs = await entry.batcher.submit(x)
        k = min(top_k, len(entry.classes))
        top_p, top_i = probs.topk(k, dim=1)
        results: list[dict[str, Any]] = []
        for row, (name, _) in enumerate(blobs):
            r: dict[str, Any] = {
                "file": name,
                "top_k": [
                    {"class": entry.classes[c], "probability": float(p)}
                    for p, c in zip(top_p[row].tolist(), top_i[row].tolist(), strict=True)
                ],
            }
            if want_preview:
                r["preview"] = _png_data_url(preview_png(arrays[row]))
            results.append(r)
        if want_saliency:
            targets = top_i[:, 0].tolist()
            try:
                urls = await loop.run_in_executor(None, saliency_urls, entry, x, targets)
            except (ImportError, UserError) as e:  # cifarlab.explain or captum missing
                for r in results:
                    r["saliency"] = None
                    r["saliency_error"] = f"saliency is not available here ({e})"
            else:
                for r, u in zip(results, urls, strict=True):
                    r["saliency"] = u
        return {"model": entry.id, "backend": entry.backend, "results": results}

    return app


def serve(
    run_dirs: Sequence[Path | str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    log_level: str = "info",
    header_timeout_s: float = 10.0,
    **kw: Any,
) -> None:
    """Check the binding, load the runs, and run uvicorn until Ctrl-C. `header_timeout_s`: a connection whose next
    request has not sent all its headers this long after it opened (or after its last response) is closed
    (`cifarlab.serve_protocol`: uvicorn alone would keep it open)."""
    import uvicorn

    from cifarlab.serve_protocol import header_deadline_protocol

    if not (math.isfinite(header_timeout_s) and header_timeout_s > 0):
        raise UserError(f"--header-timeout {header_timeout_s}: give a number of seconds above 0")
    token = clean_token(token or os.environ.get(TOKEN_ENV))  # a blank token is none: then local_only guards
    check_bind(host, token)
    app = create_app(run_dirs, token=token, local_only=token is None, **kw)
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=log_level,
            server_header=False,
            http=header_deadline_protocol(header_timeout_s),
        )
    except SystemExit as e:  # uvicorn exits when it cannot start, after logging why (a port in use, mostly)
        if e.code not in (0, None):
            raise UserError(
                f"the server could not start on {host}:{port} (uvicorn's ERROR line above says why; a port in use: "
                "pick another --port)"
            ) from None
        raise
