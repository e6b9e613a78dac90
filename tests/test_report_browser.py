"""The HTML report opened in headless Chromium renders every image (no broken images).

A copy of report.html gets a small inline script that, once the page has loaded, counts the images that did
not decode (`complete && naturalWidth > 0` fails) and writes the counts into <body> attributes; Chromium's
`--dump-dom` prints the DOM after the load. A page with a deliberately broken image checks the check.
Skips with a reason where Chromium is not installed (.ci/run installs Debian's `chromium` package).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium); .ci/run installs it"
    ),
]

CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0); });
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken", String(broken.length));
  document.body.setAttribute("data-sizes", imgs.map(function (i) { return i.naturalWidth + "x" + i.naturalHeight; })
    .join(","));
  document.body.setAttribute("data-shown", imgs.map(function (i) { return i.width + "x" + i.height; }).join(","));
});
</script>
"""


def open_in_chromium(page: Path, tmp_path: Path) -> dict[str, str]:
    """Load `page` (a copy of the report with CHECK injected) headless; return the <body> attributes it set."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no network, even if the page asked for it
        "--virtual-time-budget=10000",  # let the load event fire before the DOM is dumped
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, f"no <body> in Chromium's DOM dump: {proc.stdout[:500]!r} {proc.stderr[-1000:]!r}"
    return dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body.group(1)))


def with_check(html_text: str, extra: str = "") -> str:
    return html_text.replace("</body>", extra + CHECK + "</body>", 1)


def test_report_renders_every_image_in_chromium(tmp_path: Path, report_built):
    run_dir, metrics = report_built  # the full report test_report.py checks (conftest.py); read only
    n_figures = len(metrics["report"]["plots"])
    text = (run_dir / "report.html").read_text()
    assert "<script" not in text  # the report itself has no scripts; only the test copy does

    page = tmp_path / "checked.html"
    page.write_text(with_check(text))
    attrs = open_in_chromium(page, tmp_path)
    assert attrs.get("data-images") == str(n_figures), attrs
    assert attrs.get("data-broken") == "0", attrs
    sizes = [tuple(map(int, s.split("x"))) for s in attrs["data-sizes"].split(",")]
    assert all(w >= 200 and h >= 150 for w, h in sizes), sizes
    # HiDPI: every PNG has at least twice the pixels it is shown at (width/height attributes at 1x)
    shown = [tuple(map(int, s.split("x"))) for s in attrs["data-shown"].split(",")]
    assert all(nw >= 1.9 * w and nh >= 1.9 * h for (nw, nh), (w, h) in zip(sizes, shown)), (sizes, shown)

    # The check itself: a page with one undecodable image reports it.
    bad = tmp_path / "broken.html"
    bad.write_text(with_check(text, extra='<img src="data:image/png;base64,AAAAAAAA" alt="broken">'))
    attrs = open_in_chromium(bad, tmp_path)
    assert attrs.get("data-images") == str(n_figures + 1) and attrs.get("data-broken") == "1", attrs
