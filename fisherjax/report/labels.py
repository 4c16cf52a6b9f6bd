"""How the report names layers on axes and in text (the names themselves are the layout's)."""

from __future__ import annotations

from fisherjax.layout import OUTSIDE_LAYERS, OUTSIDE_LAYERS_NAME, layer_name

__all__ = ["OUTSIDE_LAYERS_NAME", "layer_name", "short_layer_name"]


def short_layer_name(layer: int) -> str:
    """An axis tick: ``"3"``, or ``"other"`` for the parameters outside the layer stack."""
    return "other" if int(layer) == OUTSIDE_LAYERS else str(int(layer))
