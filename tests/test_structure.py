"""The code's shape: imports point one way, private names stay in their module, the CPU/GPU choice
is made in one place, and the maths never draws."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fisherjax"


def _sources(*folders: str):
    for folder in folders:
        yield from sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.rglob("*.py"))


def test_no_import_cycle_and_no_private_name_across_modules():
    """scripts/import_graph.py reads every import (also those inside functions) with ast."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 cycle(s), 0 private import(s)" in run.stdout


def test_the_backend_is_asked_in_one_place():
    offenders = [f"{f.relative_to(ROOT)}:{n}" for f in _sources("") if f.name != "backend.py"
                 for n, line in enumerate(f.read_text().splitlines(), 1) if "default_backend(" in line]
    assert not offenders, f"jax.default_backend() outside fisherjax/backend.py: {offenders}"


def test_maths_modules_never_import_matplotlib_and_nothing_switches_its_backend():
    maths = [f for f in _sources("") if "report" not in f.relative_to(PACKAGE).parts]
    drawing = [str(f.relative_to(ROOT)) for f in maths if re.search(r"^\s*(import|from) matplotlib", f.read_text(), re.M)]
    assert not drawing, f"maths modules importing matplotlib: {drawing}"
    switching = [str(f.relative_to(ROOT)) for f in _sources("") if "matplotlib.use(" in f.read_text() or "import matplotlib.pyplot" in f.read_text()]
    assert not switching, f"modules using pyplot's global state or switching the backend: {switching}"
