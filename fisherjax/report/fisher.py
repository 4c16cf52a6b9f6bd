"""Phase 1 as a reader sees it: what each task's Fisher rests on (samples, tokens, loss) and how
large it is; and the run's heading (model, machine)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fisherjax.fisher.factored import FactoredGrads, stored_dtype
from fisherjax.fisher.state import SampleGrads, TaskFisher
from fisherjax.report.base import Section


def summary(fishers: Mapping[str, TaskFisher]) -> dict:
    """The ``results.json["fisher"]`` section: per task its samples, skipped samples, tokens, loss
    per token, Fisher type, accumulation mode and the sum of every group value (``total_fisher``;
    a leaf with two views, such as an MLP out kernel's channels and neurons, counts in both — the
    trace of the diagonal Fisher is Phase 2's ``total_fisher``) and, with kept per-sample
    gradients, how they are kept (:func:`kept_summary`)."""
    return {
        name: {
            "samples": f.n_samples,
            "skipped_samples": f.n_skipped,
            "skipped_ids": list(f.skipped_ids),
            "tokens": f.n_tokens,
            "loss_per_token": f.loss_per_token,
            "fisher_type": f.fisher_type,
            "mode": f.mode,
            "total_fisher": float(sum(float(np.sum(v)) for groups in f.group_fisher.values() for v in groups.values())),
            **({"kept": kept_summary(f.sample_grads)} if f.sample_grads is not None else {}),
        }
        for name, f in fishers.items()
    }


def kept_summary(kept: SampleGrads) -> dict:
    """How a task's per-sample gradients are kept: the parameters kept as token factors and as
    gradients, the bytes they take, and the bytes their gradients would take."""
    factored = sorted(p for p, g in kept.grads.items() if isinstance(g, FactoredGrads))
    stored = sum(g.stored_nbytes if isinstance(g, FactoredGrads) else int(g.nbytes) for g in kept.grads.values())
    as_gradients = sum(int(np.prod(g.shape)) * stored_dtype(g).itemsize for g in kept.grads.values())
    return {"as_factors": factored, "as_gradients": sorted(p for p in kept.grads if p not in factored), "bytes": stored,
            "bytes_as_gradients": as_gradients}


def section(fishers: Mapping[str, TaskFisher]) -> Section:
    data = summary(fishers)
    lines = ["| task | samples | skipped | tokens | loss / token | total group Fisher |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['samples']} | {r['skipped_samples']} | {r['tokens']} | {r['loss_per_token']:.4g} | {r['total_fisher']:.4g} |"
              for name, r in data.items()]
    kept = {name: r["kept"] for name, r in data.items() if "kept" in r}
    if kept:
        lines += ["", "Kept per-sample attention gradients (Phases 5 and 6 read them): "
                  + "; ".join(f"{name} {k['bytes'] / 1e6:.4g} MB" + (f", {len(k['as_factors'])} kernels as token factors "
                                                                     f"({k['bytes_as_gradients'] / 1e6:.4g} MB as gradients)"
                                                                     if k["as_factors"] else "")
                              for name, k in kept.items()) + "."]
    return Section("fisher", "Phase 1 — Fisher information", data, lines)


def heading(model: Mapping, created: str, machine: Mapping, seconds: float | None) -> list[str]:
    """The lines under the report's title: the model and where and when the run happened."""
    took = f", {seconds} s" if seconds is not None else ""
    return [
        f"Model: `{model['source']}` — {model['model_type']} ({model['family']}), {model['layers']} layers, "
        f"{model['heads']} heads / {model['kv_heads']} kv heads, head_dim {model['head_dim']}, {model['parameters']:,} parameters.",
        f"Created {created} on {machine['platform']} ({machine['jax_backend']}){took}.",
        "",
    ]
