"""Progress bars for the long loops of every phase (tqdm, which picks a notebook widget or a
terminal bar for us).

:func:`progress_bar` returns a bar whose total is known whenever the caller knows it, or a
do-nothing stand-in when progress is off, so loops never branch on ``None``.
"""

from __future__ import annotations


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


def progress_bar(enabled: bool, *, total: int | None, desc: str, unit: str):
    """A ``tqdm.auto`` bar (not left on screen when done) or a silent stand-in.

    ``total``: the number of ``unit`` steps when known (a bar with an ETA), else None (a counter).
    """
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
