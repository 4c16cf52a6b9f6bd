"""Everything a reader of ``fisherjax analyze`` sees: ``results.json`` sections, figures and the
lines of ``report.md``.

The analysis modules compute numbers (pytrees of arrays); this package turns them into what is
shown, one module per phase (:mod:`.fisher`, :mod:`.importance`, :mod:`.masks`,
:mod:`.natural`, :mod:`.conflicts`, :mod:`.qkov`), each with a ``section(...) ->``
:class:`Section`, and :mod:`.timing` for what the run cost. :func:`write` saves a run's
sections — figures under ``figures/`` (:func:`save_figures`, which a run may call first to time
the drawing), ``results.json`` and ``report.md`` in phase order. No module here changes a number.
"""

from __future__ import annotations

from fisherjax.report.base import Section, jsonable, save_figures, write
from fisherjax.report.figures import new_figure, save_figure

__all__ = ["Section", "jsonable", "new_figure", "save_figure", "save_figures", "write"]
