"""Phase 7 as a reader sees it: the per-parameter Fisher behind ``scale_by_fisher`` / EWC, and how
a Fisher-weighted merge of two tasks would split the model."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from fisherjax.analysis import natural
from fisherjax.fisher.state import TaskFisher
from fisherjax.layout import ModelLayout, flatten, layer_name
from fisherjax.report.base import Section
from fisherjax.stats import pooled_quantiles


def summary(fishers: Mapping[str, TaskFisher], layout: ModelLayout, *, eps: float = 1e-8, floor: float = 1e-8, dominance: float = 0.9) -> dict:
    """The ``results.json["natural"]`` section.

    Per task: quantiles (0, 1, 50, 99, 100 %) of the per-parameter Fisher
    (:func:`~fisherjax.analysis.natural.parameter_fisher`) and the fraction of parameters below
    ``eps`` (where ``scale_by_fisher`` amplifies updates by about ``1/ε``). Per pair of tasks:
    :func:`~fisherjax.analysis.natural.merge_weights` over the model and per layer.
    """
    per_param = {name: flatten(natural.parameter_fisher(f, layout)) for name, f in fishers.items()}
    tasks = {}
    for name, flat in per_param.items():
        leaves = list(flat.values())
        size = sum(int(np.size(v)) for v in leaves)
        quantiles = pooled_quantiles(leaves, [0, 0.01, 0.5, 0.99, 1])  # no model-sized float64 copy
        tasks[name] = {
            "n_parameters": size,
            "quantiles": dict(zip(("0", "1", "50", "99", "100"), quantiles.tolist(), strict=True)),
            "fraction_below_eps": sum(int(np.count_nonzero(np.asarray(v) < np.float64(eps))) for v in leaves) / size,
            "eps": eps,
        }
    pairs = {}
    for (a, fa), (b, fb) in itertools.combinations(per_param.items(), 2):
        w = natural.merge_weights(fa, fb, layout, floor=floor, dominance=dominance)
        pairs[f"{a}|{b}"] = {
            "mean_weight_a": float(w.total[0]),
            "fraction_dominated_by_a": float(w.total[1]),
            "fraction_dominated_by_b": float(w.total[2]),
            "per_layer": {
                "layer": w.layers.tolist(),
                "name": [layer_name(x) for x in w.layers.tolist()],
                "mean_weight_a": w.mean_weight_a.tolist(),
                "fraction_dominated_by_a": w.dominated_by_a.tolist(),
                "fraction_dominated_by_b": w.dominated_by_b.tolist(),
            },
        }
    return {"tasks": tasks, "merge_weights": pairs, "floor": floor, "dominance": dominance}


def section(fishers: Mapping[str, TaskFisher], layout: ModelLayout) -> Section:
    """Phase 7: the summary, with one line per task and one per pair of tasks."""
    data = summary(fishers, layout)
    lines = []
    for name, t in data["tasks"].items():
        lines.append(f"- {name}: median per-parameter Fisher {t['quantiles']['50']:.3g}, "
                     f"{100 * t['fraction_below_eps']:.1f} % of parameters below ε = {t['eps']:g}")
    for pair, m in data["merge_weights"].items():
        a, b = pair.split("|")
        lines.append(f"- merging {a} and {b} by Fisher: {a} would take {m['mean_weight_a']:.2f} of the weight on average; "
                     f"{100 * m['fraction_dominated_by_a']:.1f} % of parameters would come almost only from {a}, "
                     f"{100 * m['fraction_dominated_by_b']:.1f} % almost only from {b} (weight > {data['dominance']:g})")
    return Section("natural", "Phase 7 — Fisher-scaled updates and merging", data, lines)
