"""`cifarlab serve`: every endpoint, uploads (multipart, raw, hostile), auth, binding, timeouts, micro-batching,
parity with `cifarlab predict`, and the ONNX backend. Tiny random-weight runs (tests/_runfolder.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import tarfile
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="cifarlab serve needs fastapi (pip install 'cifarlab[serve]')")
# httpx2: what starlette's test client uses (with plain httpx it warns that httpx is deprecated there)
httpx = pytest.importorskip("httpx2", reason="the serve tests need httpx2 (pip install -e '.[dev]')")
from fastapi.testclient import TestClient  # noqa: E402

from _runfolder import CLASSES, make_run, tiny_recipe  # noqa: E402
from cifarlab import inference, predict  # noqa: E402
from cifarlab.device import autocast_dtype  # noqa: E402
from cifarlab.errors import UserError  # noqa: E402
from cifarlab.runs import load_run  # noqa: E402
from cifarlab.serve import check_bind, create_app, is_loopback  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MiB = 2**20


# -- images --------------------------------------------------------------------------------------------------


def png_bytes(size: tuple[int, int] = (48, 40), seed: int = 0, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, fmt)
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (640, 480), seed: int = 1) -> bytes:
    """A smooth photo-like JPEG (gradients + a disc), bigger than the model's input."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // w, yy * 255 // h, ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (h / 3) ** 2) * 200], -1)
    a = (a + np.random.default_rng(seed).integers(0, 30, a.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def cifar_image() -> bytes:
    """A real CIFAR-10 test image (32x32 JPEG) from ../shared/data when present, else a CIFAR-like 32x32 PNG."""
    archive = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if archive.is_file():
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    f = tar.extractfile(member)
                    if f is not None:
                        return f.read()
    a = np.zeros((32, 32, 3), np.uint8)
    a[:16] = (110, 160, 220)  # sky
    a[16:] = (90, 140, 60)  # grass
    a[10:22, 8:24] = (200, 40, 40)  # a red car
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height (10 gigapixels), tiny payload (as in test_predict.py)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    )


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "20260101-120000-reference", tiny_recipe())


@pytest.fixture(scope="module")
def air_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """airnet: standardization, flip_translate TTA and a softmax temperature, so parity with `predict` (which
    test_calibrate checks against the logits) covers the run's options."""
    root = tmp_path_factory.mktemp("runs")
    return make_run(root / "20260101-130000-fast", tiny_recipe("airnet"), seed=1, temperature=0.5)


@pytest.fixture(scope="module")
def client(run_dir: Path, air_run_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app([run_dir, air_run_dir])) as c:
        yield c


def post_file(c: TestClient, data: bytes, name: str = "x.png", query: str = "", field: str = "file") -> Any:
    return c.post(f"/v1/predict{query}", files={field: (name, data, "application/octet-stream")})


def assert_ok(c: TestClient) -> None:
    r = post_file(c, png_bytes(), query="?preview=false")
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["top_k"][0]["class"] in CLASSES


# -- endpoints -----------------------------------------------------------------------------------------------


def test_healthz_models_and_pages(client: TestClient, run_dir: Path, air_run_dir: Path):
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["models"] == 2
    assert h.json()["auth"] is False

    m = client.get("/v1/models").json()
    assert m["default"] == run_dir.name
    ids = [x["id"] for x in m["models"]]
    assert ids == [run_dir.name, air_run_dir.name]
    card = m["models"][1]
    assert card["recipe"] == "fast" and card["architecture"] == "airnet" and card["dataset"] == "synthetic"
    assert card["classes"] == list(CLASSES) and card["input_shape"] == [3, 32, 32]
    assert card["backend"] == "torch" and card["tta"] == "flip_translate" and card["temperature"] == 0.5
    assert m["models"][0]["temperature"] == 1.0  # the reference run has none
    assert card["test_accuracy"] is None and card["report"] is None  # no metrics.json / report.html here
    assert client.get(f"/v1/models/{air_run_dir.name}").json() == card
    assert client.get("/v1/models/nope").status_code == 404

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for ident in ('id="file"', 'id="model"', 'id="top1"', 'id="saliency"', 'id="preview"', '<label for="file"'):
        assert ident in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: nothing external

    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert "http" not in docs.text.replace("http://127.0.0.1:8000", "")  # no CDN assets
    spec = client.get("/openapi.json").json()
    assert {"/healthz", "/v1/models", "/v1/predict", "/v1/models/{model_id}/report"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert client.get("/redoc").status_code == 404


def test_model_card_report_and_plots(tmp_path: Path):
    run = make_run(tmp_path / "20260101-140000-reference", tiny_recipe())
    (run / "metrics.json").write_text(json.dumps({"test_accuracy": 0.8125, "test_loss": 0.61}))
    per_class = {c: {"precision": 0.8, "recall": 0.5 + i / 20, "f1": 0.7, "support": 10} for i, c in enumerate(CLASSES)}
    pairs = [{"a": "cat", "b": "dog", "count": 7, "a_to_b": 4, "b_to_a": 3}]
    (run / "eval_test.json").write_text(json.dumps({"accuracy": 0.8, "per_class": per_class, "confused_pairs": pairs}))
    (run / "report.html").write_text("<!doctype html><title>report</title><img src='plots/curves.png'>")
    (run / "plots").mkdir()
    (run / "plots" / "curves.png").write_bytes(png_bytes((8, 8)))
    (tmp_path / "secret.png").write_bytes(b"secret")
    with TestClient(create_app([run])) as c:
        card = c.get("/v1/models").json()["models"][0]
        assert card["test_accuracy"] == 0.8125 and card["test_loss"] == 0.61
        assert card["per_class_recall"]["airplane"] == 0.5 and card["per_class_recall"]["truck"] == 0.95
        assert card["confused_pairs"] == pairs
        assert card["report"] == f"/v1/models/{run.name}/report"
        r = c.get(card["report"])
        assert r.status_code == 200 and "<title>report</title>" in r.text
        assert "default-src 'none'" in r.headers["content-security-policy"]
        p = c.get(f"/v1/models/{run.name}/plots/curves.png")  # the report's relative plots/ links resolve here
        assert p.status_code == 200 and p.headers["content-type"] == "image/png"
        for bad in ("..%2Fsecret.png", "missing.png", "curves.txt", "%2E%2E%2F%2E%2E%2Fsecret.png"):
            r = c.get(f"/v1/models/{run.name}/plots/{bad}")
            assert r.status_code == 404 and "error" in r.json()


def test_the_card_says_which_tta_its_test_figures_were_measured_with(tmp_path: Path):
    """Both backends run the recipe's TTA (the ONNX graph holds it): no note. Figures measured with other views
    than the backend runs get a note saying so."""
    pytest.importorskip("onnxruntime")
    from cifarlab.runs import load_run
    from cifarlab.serve import model_card

    run_dir = make_run(tmp_path / "20260101-140000-fast", tiny_recipe("airnet").replace(tta="flip"))
    run = load_run(run_dir)
    (run.path / "metrics.json").write_text(
        json.dumps({"test_accuracy": 0.8125, "evaluation": {"inference": {"tta": "flip"}}})
    )
    for backend in ("torch", "onnx"):
        with TestClient(create_app([run_dir], backend=backend)) as c:
            card = c.get("/v1/models").json()["models"][0]
        assert card["backend"] == backend and card["tta"] == "flip" and card["test_accuracy"] == 0.8125
        assert card["test_figures_tta"] == "flip" and card["note"] is None
    other = model_card(run, "m", "onnx", "none")  # a backend running other views than the evaluation's
    assert other["test_accuracy"] == 0.8125 and other["test_figures_tta"] == "flip"
    assert other["note"].startswith("test figures measured with TTA flip; this backend runs TTA none")


def test_report_missing_is_404(client: TestClient, run_dir: Path):
    r = client.get(f"/v1/models/{run_dir.name}/report")
    assert r.status_code == 404 and "cifarlab report" in r.json()["error"]


# -- predictions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["png", "jpeg", "cifar", "gray", "ppm", "pgm"])
@pytest.mark.parametrize("which", ["reference", "airnet"])
def test_predict_matches_cifarlab_predict(
    client: TestClient, run_dir: Path, air_run_dir: Path, tmp_path: Path, kind: str, which: str
):
    """The service's answer for some bytes is identical to `cifarlab predict` on a file holding them."""
    data = {
        "png": png_bytes,
        "jpeg": jpeg_bytes,
        "cifar": cifar_image,
        "gray": lambda: png_bytes((20, 30), mode="L"),
        # Netpbm, which `cifarlab predict` reads: the service refused it with 415 until session 16
        "ppm": lambda: png_bytes((20, 30), fmt="PPM"),
        "pgm": lambda: png_bytes((20, 30), mode="L", fmt="PPM"),
    }[kind]()
    run = run_dir if which == "reference" else air_run_dir
    f = tmp_path / "image.bin"  # the extension does not matter to either
    f.write_bytes(data)
    expected = predict.predict_paths(run, [f], top_k=5)[0]["top_k"]
    r = post_file(client, data, name="image.bin", query=f"?model={run.name}&top_k=5")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == run.name and body["backend"] == "torch"
    res = body["results"][0]
    assert res["file"] == "image.bin"
    assert res["top_k"] == expected  # same classes, bit-identical probabilities
    preview = decode_data_url(res["preview"])
    assert preview.size == (256, 256)  # 32x32 as the model sees it, upscaled 8x
    assert "saliency" not in res  # only on request


def test_raw_bytes_decided_by_content_not_declared_type(client: TestClient):
    jpeg = jpeg_bytes()
    ref = post_file(client, jpeg, name="photo.jpg").json()["results"][0]["top_k"]
    for ctype in ("image/jpeg", "image/png", "application/octet-stream", "text/plain"):
        r = client.post("/v1/predict", content=jpeg, headers={"Content-Type": ctype})
        assert r.status_code == 200, (ctype, r.text)
        assert r.json()["results"][0]["top_k"] == ref and r.json()["results"][0]["file"] == "body"
    # a PNG named .txt is an image; a text file named .png is not
    assert post_file(client, png_bytes(), name="notes.txt").status_code == 200


def test_many_files_multipart(client: TestClient):
    images = [png_bytes(seed=i) for i in range(3)] + [jpeg_bytes((100, 60)), cifar_image()]
    singles = [post_file(client, d, query="?preview=false").json()["results"][0]["top_k"] for d in images]
    files = [("files", (f"img{i}.png", d, "image/png")) for i, d in enumerate(images[:4])]
    files.append(("file", ("last.jpg", images[4], "image/jpeg")))
    r = client.post("/v1/predict?top_k=2&preview=false", files=files)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["file"] for x in res] == ["img0.png", "img1.png", "img2.png", "img3.png", "last.jpg"]
    for got, single in zip(res, singles):
        assert len(got["top_k"]) == 2
        assert [t["class"] for t in got["top_k"]] == [t["class"] for t in single[:2]]
        np.testing.assert_allclose([t["probability"] for t in got["top_k"]], [t["probability"] for t in single[:2]],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_saliency_overlay(client: TestClient, air_run_dir: Path):
    pytest.importorskip("cifarlab.explain", reason="cifarlab.explain is not there yet")
    pytest.importorskip("captum", reason="saliency needs captum (pip install 'cifarlab[explain]')")
    r = post_file(client, cifar_image(), query=f"?saliency=true&model={air_run_dir.name}")
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert "saliency_error" not in res, res.get("saliency_error")
    overlay = decode_data_url(res["saliency"])
    assert overlay.size == (256, 256) and overlay.mode == "RGB"


def test_parameters_are_checked(client: TestClient):
    png = png_bytes()
    for query, status in (("?top_k=0", 422), ("?top_k=abc", 422), ("?saliency=maybe", 422), ("?model=nope", 404)):
        r = post_file(client, png, query=query)
        assert r.status_code == status, (query, r.text)
        assert set(r.json()) == {"error"} and r.json()["error"]
    assert "top_k" in post_file(client, png, query="?top_k=0").json()["error"]
    r = post_file(client, png, query="?top_k=100&preview=false")  # more than there are classes: all of them
    assert r.status_code == 200 and len(r.json()["results"][0]["top_k"]) == len(CLASSES)
    assert abs(sum(t["probability"] for t in r.json()["results"][0]["top_k"]) - 1) < 1e-5
    r = client.post("/v1/predict", files={"other": ("a.png", png)})
    assert r.status_code == 400 and "'file' or 'files'" in r.json()["error"]
    r = client.post("/v1/predict", data={"file": "not a file"}, files={"x": ("a.png", png)})
    assert r.status_code == 400 and "must be a file" in r.json()["error"]
    r = client.post("/v1/predict", content=b"--xx\r\nbroken", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400
    assert client.get("/v1/predict").status_code == 405 and "error" in client.get("/v1/predict").json()
    assert client.get("/nowhere").json() == {"error": "no such endpoint: GET /nowhere"}


def test_too_many_files(run_dir: Path):
    with TestClient(create_app([run_dir], max_batch=4)) as c:
        files = [("files", (f"{i}.png", png_bytes(seed=i))) for i in range(5)]
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 413 and "at most 4" in r.json()["error"]
        assert_ok(c)


# -- hostile uploads -----------------------------------------------------------------------------------------

HOSTILE = {
    "empty body": (lambda: b"", "raw", 400, "empty"),
    "empty file": (lambda: b"", "multipart", 400, "empty"),
    "text named .png": (lambda: b"just some text\n" * 20, "multipart", 415, "not an image"),
    "truncated png": (lambda: png_bytes((64, 64))[:300], "multipart", 400, "truncated"),
    "jpeg cut in its header": (lambda: jpeg_bytes()[:100], "raw", 400, "Truncated File Read"),
    "svg": (lambda: SVG, "multipart", 415, "SVG"),
    "svg raw": (lambda: SVG, "raw", 415, "SVG"),
    "html": (lambda: b"<html><script>alert(1)</script></html>", "raw", 415, "not a raster image"),
    "decompression bomb": (bomb_png, "multipart", 413, "pixel limit"),
    "garbage": (lambda: bytes(range(256)) * 40, "raw", 415, "not an image"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_upload(client: TestClient, case: str):
    make, how, status, words = HOSTILE[case]
    data = make()
    if how == "raw":
        r = client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"})
    else:
        r = post_file(client, data, name="evil.png")
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and words in r.json()["error"], r.json()
    assert_ok(client)  # the service is still fine


@pytest.mark.parametrize("cut", ["header", "data"])
def test_a_truncated_jpeg_gets_predicts_words(client: TestClient, run_dir: Path, tmp_path: Path, cut: str):
    """A JPEG cut short (an interrupted upload or copy) is damaged image data, not "not an image": the service says
    what `cifarlab predict` says for the same bytes, with 400 (415 stays for bytes no image format claims)."""
    whole = jpeg_bytes()
    data = whole[:100] if cut == "header" else whole[: len(whole) // 2]  # in the markers, or in the scan
    with Image.open(io.BytesIO(whole)) as im:
        assert im.format == "JPEG" and im.size == (640, 480)  # a real JPEG, cut
    f = tmp_path / "cut.jpg"
    f.write_bytes(data)
    [expected] = predict.predict_paths(run_dir, [f])
    assert "truncated" in expected["error"].lower() and "top_k" not in expected, expected
    for r in (
        post_file(client, data, name="cut.jpg"),
        client.post("/v1/predict", content=data, headers={"Content-Type": "image/jpeg"}),
    ):
        name = "cut.jpg" if r.request.headers["content-type"].startswith("multipart") else "body"
        assert r.status_code == 400, r.text
        assert r.json() == {"error": f"{name}: {expected['error']}"}
    assert_ok(client)


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "SGI", "EPS"])
def test_predict_and_serve_read_the_same_formats(client: TestClient, run_dir: Path, tmp_path: Path, fmt: str):
    """Formats Pillow decodes but the service refused (415) were classified by `cifarlab predict`: both now read
    the one list in cifarlab.data.images and name it in their error."""
    from cifarlab.data.images import FORMAT_NAMES

    if fmt == "EPS":  # never handed to Pillow's EPS plugin (Ghostscript): refused from its bytes
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    else:
        data = png_bytes((16, 16), fmt=fmt)
    f = tmp_path / "image.png"
    f.write_bytes(data)
    [expected] = predict.predict_paths(run_dir, [f])
    assert expected.get("error") == f"not an image cifarlab reads (send {FORMAT_NAMES})", expected
    r = post_file(client, data, name="image.png")
    assert r.status_code == 415 and FORMAT_NAMES in r.json()["error"], r.text


def test_bomb_refused_before_decoding(client: TestClient):
    t = time.perf_counter()
    r = client.post("/v1/predict", content=bomb_png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "10,000,000,000 pixels" in r.json()["error"]
    assert time.perf_counter() - t < 2


def _chunks(total: int, produced: list[int], size: int = 64 * 1024, prefix: bytes = b"") -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        chunk = b"\x89PNG" + b"\0" * (size - 4)
        if prefix:
            yield prefix
        while produced[0] < total:
            produced[0] += size
            yield chunk

    return gen()


def test_50mb_body_is_refused_while_streaming(run_dir: Path):
    """A 50 MB body (no Content-Length) is cut off at the 32 MiB limit: no more is read, quickly."""
    app = create_app([run_dir])

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
            for ctype, prefix in (("image/png", b""), ("multipart/form-data; boundary=xyz", part)):
                produced = [0]
                t = time.perf_counter()
                body = _chunks(50 * MiB, produced, prefix=prefix)
                r = await c.post("/v1/predict", content=body, headers={"Content-Type": ctype})
                assert r.status_code == 413, r.text
                assert "32 MiB" in r.json()["error"]
                assert produced[0] <= 32 * MiB + 128 * 1024, produced  # stopped reading right at the limit
                assert time.perf_counter() - t < 10
            # a declared length over the limit is refused before one byte is read
            produced = [0]
            r = await c.post(
                "/v1/predict",
                content=_chunks(50 * MiB, produced),
                headers={"Content-Type": "image/png", "Content-Length": str(50 * MiB)},
            )
            assert r.status_code == 413 and produced[0] == 0
            r = await c.post("/v1/predict?preview=false", content=png_bytes())
            assert r.status_code == 200

    asyncio.run(scenario())


def test_upload_limit_is_configurable(run_dir: Path):
    with TestClient(create_app([run_dir], max_upload_bytes=1000)) as c:
        r = c.post("/v1/predict", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 413
        assert post_file(c, png_bytes((8, 8))).status_code == 200


# -- security ------------------------------------------------------------------------------------------------


def test_bearer_token(run_dir: Path):
    with TestClient(create_app([run_dir], token="s3cret-token")) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/healthz").json()["auth"] is True
        assert c.get("/").status_code == 200  # the page loads; it asks for the token
        r = c.get("/v1/models")
        assert r.status_code == 401 and "missing bearer token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
        for auth in ("Bearer wrong", "Basic czNjcmV0LXRva2Vu", "s3cret-token", "Bearer "):
            r = c.get("/v1/models", headers={"Authorization": auth})
            assert r.status_code == 401, auth
        r = post_file(c, png_bytes())
        assert r.status_code == 401
        ok = {"Authorization": "Bearer s3cret-token"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        r = c.post("/v1/predict", content=png_bytes(), headers={**ok, "Content-Type": "image/png"})
        assert r.status_code == 200


def test_loopback_and_bind_check():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com", ""))
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "token")
    for blank in (None, "", "   "):  # a token of spaces is no token
        with pytest.raises(UserError, match="without a token"):
            check_bind("0.0.0.0", blank)


def test_a_token_with_spaces_around_it_works_as_the_client_sends_it(run_dir: Path):
    """Clients' tokens are stripped; the service's must be too, or "abc " would refuse everyone."""
    with TestClient(create_app([run_dir], token=" s3cret-token\n")) as c:
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_head_probes_an_empty_model_and_non_finite_settings(run_dir: Path):
    """Monitoring probes with HEAD; `?model=` left empty is the default model; nan settings are refused (a nan
    timeout answered every request with 504 at once)."""
    with TestClient(create_app([run_dir])) as c:
        for path in ("/", "/healthz", "/v1/models"):
            assert c.head(path).status_code == 200, path
        r = c.post("/v1/predict?model=&preview=false", content=png_bytes(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["model"] == run_dir.name
    for kw in ({"timeout_s": float("nan")}, {"max_wait_ms": float("nan")}, {"timeout_s": float("inf")}):
        with pytest.raises(UserError, match="all finite numbers"):
            create_app([run_dir], **kw)


def test_cli_serve(run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    import uvicorn

    from cifarlab.cli import build_parser, main

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    monkeypatch.delenv("CIFARLAB_SERVE_TOKEN", raising=False)

    assert "serve" in build_parser().format_help()
    assert main(["serve", str(run_dir), "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0 without a token" in capsys.readouterr().err
    assert not calls

    assert main(["serve", str(run_dir), "--port", "8123", "--max-batch", "8", "--backend", "torch"]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8123
    assert calls[-1]["http"].header_timeout == 10.0  # idle or trickling connections are closed (serve_protocol)
    assert main(["serve", str(run_dir), "--header-timeout", "2.5"]) == 0 and calls[-1]["http"].header_timeout == 2.5
    n = len(calls)
    for bad in ("0", "-1", "nan", "inf"):
        assert main(["serve", str(run_dir), "--header-timeout", bad]) == 2
        assert "--header-timeout" in capsys.readouterr().err and len(calls) == n

    monkeypatch.setenv("CIFARLAB_SERVE_TOKEN", "from-env")
    assert main(["serve", str(run_dir), "--host", "0.0.0.0"]) == 0
    with TestClient(calls[-1]["app"]) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200

    assert main(["serve", str(run_dir / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err

    def cannot_bind(app: Any, **kw: Any) -> None:  # what uvicorn does after logging "address already in use"
        raise SystemExit(1)

    monkeypatch.setattr(uvicorn, "run", cannot_bind)
    monkeypatch.delenv("CIFARLAB_SERVE_TOKEN")
    assert main(["serve", str(run_dir), "--port", "8124"]) == 2
    assert "the server could not start on 127.0.0.1:8124" in capsys.readouterr().err


def test_non_finite_weights_are_refused(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    run = make_run(tmp_path / "20260101-150000-reference", tiny_recipe())
    state = load_file(str(run / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(run / "model.safetensors"))
    with pytest.raises(UserError, match="NaN/inf"):
        create_app([run])


def test_duplicate_ids_and_bad_settings(run_dir: Path, tmp_path: Path):
    twin = make_run(tmp_path / run_dir.name, tiny_recipe())
    with pytest.raises(UserError, match="two runs are named"):
        create_app([run_dir, twin])
    with pytest.raises(UserError):
        create_app([run_dir], max_batch=0)
    with pytest.raises(UserError):
        create_app([])


# -- timeouts and micro-batching -----------------------------------------------------------------------------


def test_timeout_is_504(run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    real = inference.predict_proba
    slow = {"on": True}

    def sleepy(*a: Any, **kw: Any) -> torch.Tensor:
        if slow["on"]:
            time.sleep(1.0)
        return real(*a, **kw)

    monkeypatch.setattr(inference, "predict_proba", sleepy)
    with TestClient(create_app([run_dir], timeout_s=0.3)) as c:
        r = post_file(c, png_bytes())
        assert r.status_code == 504 and "longer than 0.3 s" in r.json()["error"]
        assert r.headers["connection"] == "close"  # what is left of the body is not read as the next request
        slow["on"] = False
        time.sleep(1.0)  # the abandoned pass finishes in its thread
        assert_ok(c)


def test_micro_batching(run_dir: Path, air_run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """N concurrent requests take fewer forward passes than N and give the sequential answers."""
    real = inference.predict_proba
    sizes: list[int] = []

    def counting(model: Any, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        sizes.append(len(x))
        return real(model, x, **kw)

    monkeypatch.setattr(inference, "predict_proba", counting)
    images = [png_bytes(seed=i) for i in range(12)] + [jpeg_bytes((90, 70), seed=i) for i in range(4)]
    n = len(images)

    async def scenario(app: Any, concurrent: bool) -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:

            async def one(i: int) -> Any:
                r = await c.post(
                    f"/v1/predict?top_k=10&preview=false&model={air_run_dir.name}",
                    content=images[i],
                    headers={"Content-Type": "application/octet-stream"},
                )
                assert r.status_code == 200, r.text
                return r.json()["results"][0]["top_k"]

            if concurrent:
                return list(await asyncio.gather(*(one(i) for i in range(n))))
            return [await one(i) for i in range(n)]

    sequential = asyncio.run(scenario(create_app([run_dir, air_run_dir], max_wait_ms=0), concurrent=False))
    assert sizes == [1] * n
    sizes.clear()
    app = create_app([run_dir, air_run_dir], max_wait_ms=200, max_batch=64)
    concurrent = asyncio.run(scenario(app, concurrent=True))
    assert sum(sizes) == n and len(sizes) < n, sizes  # batched: fewer passes than requests
    assert max(sizes) > 1
    batcher = app.state.models[air_run_dir.name].batcher
    assert batcher.passes == len(sizes) and batcher.images == n
    for seq, con in zip(sequential, concurrent):
        as_dict = {t["class"]: t["probability"] for t in con}
        for t in seq:  # the same classes; probabilities equal up to float rounding of a different batch size
            assert as_dict[t["class"]] == pytest.approx(t["probability"], rel=1e-4, abs=1e-6)

    sizes.clear()
    small = create_app([run_dir, air_run_dir], max_wait_ms=200, max_batch=4)
    asyncio.run(scenario(small, concurrent=True))
    assert sum(sizes) == n and max(sizes) <= 4 and len(sizes) >= n // 4


# -- ONNX backend --------------------------------------------------------------------------------------------


def test_onnx_backend(run_dir: Path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    assert not (run_dir / "model.onnx").exists()
    # ONNX Runtime computes in fp32 on the CPU: compare with the torch backend there (on a GPU it may use TF32/bf16).
    # The torch backend keeps the run's precision: 'auto' is bf16 on a CPU with bf16 units (3 significant digits).
    bf16 = autocast_dtype(load_run(run_dir).recipe.precision, torch.device("cpu")) == torch.bfloat16
    tolerance = 1e-2 if bf16 else 1e-4
    with TestClient(create_app([run_dir], backend="onnx")) as c, TestClient(create_app([run_dir], device="cpu")) as cpu:
        assert not (run_dir / "model.onnx").exists()  # exported to a temporary file, not into the run
        card = c.get("/v1/models").json()["models"][0]
        assert card["backend"] == "onnx" and card["tta"] == "none"  # the reference recipe's
        for data in (png_bytes(), jpeg_bytes(), cifar_image()):
            r = post_file(c, data, query="?top_k=10&preview=false")
            assert r.status_code == 200, r.text
            assert r.json()["backend"] == "onnx"
            got = {t["class"]: t["probability"] for t in r.json()["results"][0]["top_k"]}
            ref = post_file(cpu, data, query="?top_k=10&preview=false").json()["results"][0]["top_k"]
            for t in ref:  # the reference recipe has no TTA: the export computes the same function
                assert got[t["class"]] == pytest.approx(t["probability"], abs=tolerance)
        assert c.post("/v1/predict", content=SVG).status_code == 415


def test_onnx_backend_never_serves_a_stale_export(tmp_path: Path):
    """A model.onnx left in the run folder from other weights (exported, then the run resumed or retrained) has the
    same classes: the weights' digest in its metadata tells it apart, and the service exports afresh."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from cifarlab.export import export_onnx
    from cifarlab.serve import _onnx_forward

    run = make_run(tmp_path / "20260101-120000-reference", tiny_recipe(), seed=0)
    export_onnx(run, run / "model.onnx")  # an export of seed 0's weights, kept in the folder
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    before = _onnx_forward(load_run(run), torch.device("cpu"))(x)  # the export matches the weights: used as is
    other = make_run(tmp_path / "other", tiny_recipe(), seed=5)
    (run / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())  # the run's weights change
    served = _onnx_forward(load_run(run), torch.device("cpu"))(x)
    expected = _onnx_forward(load_run(other), torch.device("cpu"))(x)
    assert not torch.allclose(before, expected, atol=1e-3)  # the stale file would answer differently
    assert torch.allclose(served, expected, atol=1e-6)


def test_onnx_and_torch_backends_give_the_same_answers_with_the_recipes_tta(tmp_path: Path):
    """The ONNX graph holds the recipe's TTA (6 views here), so both backends answer alike: the same classes and, in
    fp32, the same probabilities to float rounding. A model.onnx in the run folder with other views (an export from
    before, or `export --tta none`) would answer differently: the service exports afresh and leaves the file."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from cifarlab.export import export_onnx, read_onnx_metadata

    recipe = tiny_recipe("airnet").replace(precision="fp32")  # bf16 on the torch side would blur the comparison
    run = make_run(tmp_path / "20260101-120000-fast", recipe, seed=3, temperature=0.7)
    export_onnx(run, run / "model.onnx", tta="none")  # what `cifarlab export` wrote before this fix
    stale = (run / "model.onnx").read_bytes()
    uploads = [png_bytes(seed=i) for i in range(8)] + [jpeg_bytes((90, 70), seed=i) for i in range(4)]
    uploads.append(cifar_image())
    files = [("files", (f"{i}.img", d)) for i, d in enumerate(uploads)]
    answers = {}
    for backend in ("onnx", "torch"):
        with TestClient(create_app([run], backend=backend, max_batch=len(files))) as c:
            card = c.get("/v1/models").json()["models"][0]
            assert card["tta"] == "flip_translate" and card["note"] is None
            r = c.post("/v1/predict?top_k=10&preview=false", files=files)
            assert r.status_code == 200 and r.json()["backend"] == backend, r.text
            answers[backend] = [{t["class"]: t["probability"] for t in x["top_k"]} for x in r.json()["results"]]
    assert (run / "model.onnx").read_bytes() == stale and read_onnx_metadata(run / "model.onnx")["tta"] == "none"
    onnx_top = [max(a, key=a.get) for a in answers["onnx"]]
    assert onnx_top == [max(a, key=a.get) for a in answers["torch"]]
    assert len(set(onnx_top)) > 1  # not one class for everything
    worst = max(abs(o[k] - t[k]) for o, t in zip(answers["onnx"], answers["torch"]) for k in CLASSES)
    assert worst < 1e-5, worst
    # The bare-model file answers differently: what serving it used to cost.
    session = ort_session(run / "model.onnx")
    arrays = [serve_decode(d) for d in uploads]
    [bare] = session.run(None, {"images": np.stack(arrays)})
    assert max(abs(float(bare[i, CLASSES.index(k)]) - t[k]) for i, t in enumerate(answers["torch"]) for k in t) > 1e-3


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def serve_decode(data: bytes) -> np.ndarray:
    from cifarlab.serve import decode

    return decode(data, "x", (3, 32, 32), 40_000_000)


def test_cli_refuses_a_non_finite_upload_limit(run_dir: Path, capsys: pytest.CaptureFixture[str]):
    from cifarlab.cli import main

    for value in ("nan", "inf", "0"):
        assert main(["serve", str(run_dir), "--max-upload-mb", value]) == 2
        err = capsys.readouterr().err
        assert "--max-upload-mb" in err and "Traceback" not in err


def test_a_service_without_a_token_answers_only_this_machine_and_its_own_pages(run_dir: Path):
    """Without a token (so on loopback only): a Host that is not a loopback name is DNS rebinding (a page whose
    name resolves to 127.0.0.1 reading the service); an Origin of another site is that site using the service
    through a visitor's browser. Both are refused; the service's own page, curl and scripts are not."""
    from cifarlab.serve import _host_name

    assert [_host_name(a) for a in ("localhost:8000", "[::1]:8000", "http://127.0.0.1:8000", "::1")] == [
        "localhost",
        "::1",
        "127.0.0.1",
        "::1",
    ]
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        with TestClient(create_app([run_dir], local_only=True), base_url=base) as c:
            assert c.get("/v1/models").status_code == 200, base
            own = {"Origin": base, "Content-Type": "image/png"}
            assert c.post("/v1/predict?preview=false", content=png_bytes(), headers=own).status_code == 200
            for origin in ("https://evil.example", "null"):
                r = c.post("/v1/predict", content=png_bytes(), headers={**own, "Origin": origin})
                assert r.status_code == 403 and "other sites" in r.json()["error"], origin
    with TestClient(create_app([run_dir], local_only=True), base_url="http://rebound.example:8000") as c:
        r = c.get("/v1/models")
        assert r.status_code == 403 and "localhost or 127.0.0.1 only" in r.json()["error"]
    with TestClient(create_app([run_dir], token="t0ken"), base_url="http://my-host.example") as c:  # a token: any name
        assert c.get("/v1/models", headers={"Authorization": "Bearer t0ken"}).status_code == 200


def test_multipart_errors_say_what_to_change(run_dir: Path):
    with TestClient(create_app([run_dir], max_batch=2)) as c:
        files = [("files", (f"{i}.png", png_bytes(), "image/png")) for i in range(3)]
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 413 and "at most 2 file parts per request" in r.json()["error"]
        # RFC 5987 `filename*=` only (as older urllib3 writes non-ASCII names): Starlette reads such a part as text
        body = (
            b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename*=utf-8''%C3%A9.png\r\n"
            b"Content-Type: image/png\r\n\r\n" + png_bytes() + b"\r\n--xyz--\r\n"
        )
        r = c.post("/v1/predict", content=body, headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        assert r.status_code == 400 and "filename*= alone is read as text" in r.json()["error"]


def test_a_blank_token_on_loopback_still_guards_the_service(run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """`--token " "` is no token: the service must keep its loopback-only guard (a blank token used to switch the
    guard off while checking no token either)."""
    import uvicorn

    from cifarlab.serve import serve

    calls: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    serve([run_dir], token="  ")
    with TestClient(calls[-1], base_url="http://rebound.example:8000") as c:
        assert c.get("/v1/models").status_code == 403
