"""Which progress bar fisherjax draws: tqdm's notebook widget only in a Jupyter kernel that can draw
it, tqdm's text bar everywhere else, a silent stand-in when progress is off (the kernel itself:
tests/test_notebooks.py::test_progress_bars_in_a_kernel_never_warn)."""

from __future__ import annotations

import sys
import warnings

import pytest
import tqdm.notebook
import tqdm.std

from fisherjax import progressbar


@pytest.mark.parametrize(
    "kernel, widgets, expected",
    [(False, False, tqdm.std.tqdm), (False, True, tqdm.std.tqdm), (True, False, tqdm.std.tqdm), (True, True, tqdm.notebook.tqdm)],
)
def test_the_widget_only_in_a_kernel_with_ipywidgets(monkeypatch, kernel, widgets, expected):
    monkeypatch.setattr(progressbar, "in_notebook_kernel", lambda: kernel)
    monkeypatch.setattr(progressbar, "notebook_widgets_available", lambda: widgets)
    assert progressbar.bar_class() is expected


def test_a_plain_process_gets_a_quiet_text_bar(capsys):
    assert not progressbar.in_notebook_kernel()  # pytest is no Jupyter kernel, even with ipykernel imported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        progressbar.quiet_tqdm_auto()  # a no-op here
        with progressbar.progress_bar(True, total=2, desc="Fisher[t]", unit="batch") as bar:
            assert type(bar) is tqdm.std.tqdm
            bar.update(2)
    assert "Fisher[t]" in capsys.readouterr().err


def test_a_terminal_ipython_or_qt_console_is_no_notebook(monkeypatch):
    pytest.importorskip("ipykernel")
    import ipykernel.zmqshell

    class Shell(ipykernel.zmqshell.ZMQInteractiveShell):
        def __init__(self):  # no kernel behind it: only its type is read
            pass

    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", ipykernel.zmqshell)
    monkeypatch.setattr(sys.modules["IPython"], "get_ipython", lambda: Shell())
    assert progressbar.in_notebook_kernel()
    monkeypatch.setenv("QT_API", "pyqt5")
    assert not progressbar.in_notebook_kernel()
    monkeypatch.delenv("QT_API")
    monkeypatch.setattr(sys.modules["IPython"], "get_ipython", lambda: object())  # a terminal IPython's shell
    assert not progressbar.in_notebook_kernel()
    monkeypatch.setattr(sys.modules["IPython"], "get_ipython", lambda: None)  # a script that imported ipykernel
    assert not progressbar.in_notebook_kernel()


def test_off_is_silent(capsys):
    with progressbar.progress_bar(False, total=2, desc="Fisher[t]", unit="batch") as bar:
        bar.update(2)
        bar.set_postfix(samples=2)
    assert capsys.readouterr() == ("", "")
