"""Progress bars for the long loops of every phase (tqdm: a widget in a notebook, text elsewhere).

:func:`progress_bar` returns a bar whose total is known whenever the caller knows it, or a
do-nothing stand-in when progress is off, so loops never branch on ``None``. :func:`bar_class`
picks the kind of bar: tqdm's notebook widget only in a Jupyter kernel that can draw it
(ipywidgets importable), else tqdm's text bar — so a kernel without ipywidgets gets text bars
quietly instead of ``tqdm.auto``'s "IProgress not found" ``TqdmWarning``. Imported in such a
kernel, this module also imports ``tqdm.auto`` with that warning ignored
(:func:`quiet_tqdm_auto`), so the bars of the libraries fisherjax loads later (transformers,
huggingface_hub) fall back to text quietly too.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings


class _Silent:
    """The stand-in when progress is off: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def in_notebook_kernel() -> bool:
    """Whether this process is a Jupyter kernel whose front end draws widgets: IPython's ZMQ shell
    (Jupyter, JupyterLab, VS Code, Colab) is running, and it is not a Qt console or Spyder (which
    draw no widgets; tqdm makes the same exceptions). Imports nothing that is not loaded already."""
    if "ipykernel.zmqshell" not in sys.modules or "IPython" not in sys.modules:
        return False
    if any(name == "QT_API" or name.startswith("SPYDER") for name in os.environ):
        return False
    shell = sys.modules["IPython"].get_ipython()
    if not isinstance(shell, sys.modules["ipykernel.zmqshell"].ZMQInteractiveShell):
        return False
    kind = type(shell).__name__.lower()
    return "qt" not in kind and "spyder" not in kind


def notebook_widgets_available() -> bool:
    """Whether tqdm's notebook bar can be drawn: ipywidgets imports (tqdm's own test, its
    ``tqdm.notebook.IProgress``, which is None when ipywidgets is missing or too old)."""
    from tqdm import notebook

    return notebook.IProgress is not None


def bar_class() -> type:
    """``tqdm.notebook.tqdm`` in a notebook kernel with ipywidgets (:func:`in_notebook_kernel`,
    :func:`notebook_widgets_available`), else ``tqdm.std.tqdm`` (text on stderr). Never warns."""
    if in_notebook_kernel() and notebook_widgets_available():
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


def progress_bar(enabled: bool, *, total: int | None, desc: str, unit: str):
    """A tqdm bar of :func:`bar_class` (not left on screen when done) or a silent stand-in.

    ``total``: the number of ``unit`` steps when known (a bar with an ETA), else None (a counter).
    """
    if not enabled:
        return _Silent()
    return bar_class()(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def quiet_tqdm_auto() -> None:
    """In a notebook kernel without ipywidgets, import ``tqdm.auto`` with its "IProgress not found"
    ``TqdmWarning`` ignored: the warning comes once, from that import, and libraries that import
    ``tqdm.auto`` later (transformers, huggingface_hub) then get its text bar without it. Does
    nothing elsewhere, with ipywidgets (no warning to quiet), or once ``tqdm.auto`` is imported."""
    if "tqdm.autonotebook" in sys.modules or not in_notebook_kernel() or notebook_widgets_available():
        return
    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
        importlib.import_module("tqdm.auto")


quiet_tqdm_auto()
