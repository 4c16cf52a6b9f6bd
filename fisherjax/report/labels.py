"""How the report names layers on axes (their names in text are the layout's :func:`~fisherjax.layout.layer_name`)."""

from __future__ import annotations

from fisherjax.layout import OUTSIDE_LAYERS


def short_layer_name(layer: int) -> str:
    """An axis tick: ``"3"``, or ``"other"`` for the parameters outside the layer stack."""
    return "other" if int(layer) == OUTSIDE_LAYERS else str(int(layer))
