"""A screenshot of `cifarlab serve`'s page classifying one image, for the docs.

    python benchmarks/serve_screenshot.py RUN_DIR IMAGE docs/serve-screenshot.png

Serves RUN_DIR on a free 127.0.0.1 port, opens the page in headless Chromium (Debian's chromium and
chromium-driver, and the selenium package), uploads IMAGE, waits for the top class and the saliency overlay,
and saves the page as a PNG.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from cifarlab.serve import create_app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(create_app([args.run_dir], local_only=True), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    flags = "--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --disable-background-networking "
    flags += "--disable-component-update --disable-sync --no-first-run --disable-quic --window-size=1200,1100"
    for flag in flags.split():
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp()}")
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "Ready" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "file").send_keys(str(args.image.resolve()))
        wait.until(lambda d: (d.find_element(By.ID, "saliency").get_attribute("src") or "").startswith("data:"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"top-1 {driver.find_element(By.ID, 'top1').text}; wrote {args.out}")
    finally:
        driver.quit()
        server.should_exit = True


if __name__ == "__main__":
    main()
