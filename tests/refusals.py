"""How a refused input must look: exit code 2, one line on stderr that names the file or option,
and nothing written or deleted next to the output directory.

    from refusals import assert_refused
    assert_refused(["analyze", ..., "--out", str(out)], parent=out.parent, names="words.jsonl")
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of everything below ``folder`` (directories too)."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        out[str(path.relative_to(folder))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return out


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``fisherjax`` in this process: ``(exit code, stdout, stderr)``."""
    from fisherjax.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def assert_refused(argv: list, *, parent: Path, names: str) -> str:
    """Run the CLI and check the refusal; returns the error line.

    ``names``: a regular expression the line must match (the file or option it names, and what is
    wrong). ``parent``: the folder around ``--out`` whose contents must not change.
    """
    before = snapshot(parent)
    code, _, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("fisherjax: error:") and "Traceback" not in err, err
    assert re.search(names, lines[0]), f"{names!r} not in: {lines[0]}"
    after = snapshot(parent)
    assert after == before, f"changed next to --out: {sorted(set(after.items()) ^ set(before.items()))}"
    return lines[0]
