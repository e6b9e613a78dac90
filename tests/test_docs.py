"""The docs stay true to the code: every test the README names as the check of a guarantee exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    refs = sorted(set(re.findall(r"tests/(\w+\.py)::(\w+)", readme)))
    assert len(refs) > 30  # "When things go wrong" names its checks
    missing = [
        f"{f}::{name}"
        for f, name in refs
        if not (ROOT / "tests" / f).is_file()
        or not re.search(rf"^def {name}\(", (ROOT / "tests" / f).read_text(), re.M)
    ]
    assert not missing, f"README names tests that do not exist: {missing}"
