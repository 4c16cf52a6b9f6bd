"""The README's Python example runs as written, on the shipped demo."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## In Python") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (In Python)", "exec"), namespace)
    assert namespace["qkov"].scores.shape[2:4] == (128, 128)
    assert namespace["conflicts"].cosines.shape == (128, 128)
    assert namespace["heads"].head.shape == (2, 4)
    assert namespace["categories"].labels.shape == (2, 4) and namespace["gates"].mean_abs.shape == (2, 4)
    assert namespace["ablation"].accuracy.shape == (2, 4) and namespace["gates"].n_samples == 32
    assert namespace["kfac_qkov"].scores.shape[2:4] == (128, 128) and namespace["top"].values.shape == (5,)
    assert namespace["spectra"].top.shape[:3] == (4, 2, 4)
