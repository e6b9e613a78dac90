"""The `cifarlab serve` web page in headless Chromium (Selenium + chromedriver) against a real uvicorn server.

Uploads a real image through `#file`, waits for `#top1`, and checks the class, the saliency overlay and the
preview. With CIFARLAB_SCREENSHOT=path the page is saved there as a PNG (the docs image). Skips cleanly
where Chromium, chromedriver or selenium is missing (.ci/run installs Debian's chromium and chromium-driver).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _runfolder import CLASSES, make_run, tiny_recipe

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)"),
    pytest.mark.skipif(DRIVER is None, reason="chromedriver is not installed (apt-get install -y chromium-driver)"),
]

selenium = pytest.importorskip("selenium", reason="the browser test needs selenium (pip install selenium)")
pytest.importorskip("fastapi", reason="cifarlab serve needs fastapi (pip install 'cifarlab[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="cifarlab serve needs uvicorn")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from cifarlab.serve import create_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("runs")
    runs = [
        make_run(root / "20260101-120000-reference", tiny_recipe()),
        make_run(root / "20260101-130000-fast", tiny_recipe("airnet"), seed=1),
    ]
    (runs[0] / "metrics.json").write_text('{"test_accuracy": 0.7312}')
    (runs[0] / "report.html").write_text("<!doctype html><title>The report</title><h1>Report</h1>")
    port = free_port()
    config = uvicorn.Config(create_app(runs, local_only=True), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--window-size=1200,1400",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def photo(path: Path) -> Path:
    """A phone-photo-like JPEG (1600x1200: the server resizes it)."""
    h, w = 1200, 1600
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // w, yy * 255 // h, ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (h / 3) ** 2) * 220], -1)
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, "JPEG", quality=85)
    path.write_bytes(buf.getvalue())
    return path


SHARED_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def cifar_image(path: Path) -> Path:
    """A real CIFAR-10 test image from the shared copy when it is beside the checkout, else a phone-like photo."""
    import tarfile

    if not SHARED_JPEG.exists():
        return photo(path)
    with tarfile.open(SHARED_JPEG) as tar:
        for member in tar:
            if member.isfile() and "/test/cat/" in member.name:
                f = tar.extractfile(member)
                assert f is not None
                path.write_bytes(f.read())
                return path
    return photo(path)


def test_page_classifies_an_uploaded_image(server: str, browser: webdriver.Chrome, tmp_path: Path):
    pytest.importorskip("cifarlab.explain", reason="cifarlab.explain (saliency) is not there yet")
    pytest.importorskip("captum", reason="saliency needs captum")
    browser.get(server + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "Ready" in d.find_element(By.ID, "status").text)

    # two runs served: the model picker is shown and labelled; the model card is filled in
    model = browser.find_element(By.ID, "model")
    assert model.is_displayed() and model.accessible_name == "Model"
    assert [o.get_attribute("value") for o in Select(model).options] == [
        "20260101-120000-reference",
        "20260101-130000-fast",
    ]
    assert "73.1%" in browser.find_element(By.ID, "card").text
    assert (
        browser.find_element(By.ID, "report")
        .get_attribute("href")
        .endswith("/v1/models/20260101-120000-reference/report")
    )

    # keyboard: Tab from the model picker reaches the file input, which has an accessible name
    model.send_keys(Keys.TAB)
    active = browser.switch_to.active_element
    assert active.get_attribute("id") == "file" and active.accessible_name == "Image"

    browser.find_element(By.ID, "file").send_keys(str(cifar_image(tmp_path / "cat.jpg")))
    top1 = wait.until(ec.visibility_of_element_located((By.ID, "top1")))
    wait.until(lambda d: d.find_element(By.ID, "top1").text.strip() != "")
    assert top1.text in CLASSES
    wait.until(lambda d: (d.find_element(By.ID, "saliency").get_attribute("src") or "").startswith("data:image/png"))
    sal = browser.find_element(By.ID, "saliency")
    assert sal.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", sal) == 256
    assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png;base64,")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#topk li")) == 5
    assert top1.text in browser.find_element(By.ID, "status").text

    shot = os.environ.get("CIFARLAB_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(shot)

    # switching the model re-classifies the same image with the other run
    Select(model).select_by_value("20260101-130000-fast")
    wait.until(lambda d: "fast" in d.find_element(By.ID, "card-id").text)
    wait.until(lambda d: d.find_element(By.ID, "top1").text in CLASSES)


def test_page_shows_server_errors(server: str, browser: webdriver.Chrome, tmp_path: Path):
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda d: "Ready" in d.find_element(By.ID, "status").text)
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello, I am text")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda d: "not an image" in d.find_element(By.ID, "status").text)
    assert "error" in (browser.find_element(By.ID, "status").get_attribute("class") or "")
