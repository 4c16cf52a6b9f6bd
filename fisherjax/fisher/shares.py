"""A TaskFisher whose per-sample arrays are split over the processes of a multi-process run,
joined again: every process receives every sample's arrays, in the data's order.

After a multi-process :func:`~fisherjax.fisher.collect.collect` the Fisher, its states and the
counts are global, while each process holds its own samples' ids, losses, token counts, group
values and kept gradients. Phases that pair samples across the whole task read them all.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fisherjax.fisher.state import SampleGrads, TaskFisher
from fisherjax.sharding import gather_rows


def join_shares(fisher: TaskFisher, order: np.ndarray) -> TaskFisher:
    """``fisher`` with every process's per-sample arrays (``gather_rows``, a collective: every
    process calls it), rows sorted by the position of their sample id in ``order`` (the sample
    ids in data order) — the order one process would have collected them in."""
    if jax.process_count() == 1:
        return fisher
    rows = {"sample_ids": fisher.sample_ids, "tokens": fisher.tokens, "losses": fisher.losses,
            "groups": fisher.per_sample_groups}
    if fisher.sample_grads is not None:
        rows["kept"] = {"ids": fisher.sample_grads.sample_ids, "tokens": fisher.sample_grads.tokens, "grads": fisher.sample_grads.grads,
                        "contributions": fisher.sample_grads.stored_contributions}
    joined = gather_rows(rows)
    skipped = gather_rows(np.asarray(fisher.skipped_ids, np.int64))
    rank = {int(s): i for i, s in enumerate(np.asarray(order))}

    def sort(tree, ids):
        index = np.argsort([rank[int(i)] for i in ids], kind="stable")
        return jax.tree.map(lambda x: x[index], tree)

    kept = None
    if "kept" in joined:
        k = sort(joined["kept"], joined["kept"]["ids"])
        kept = SampleGrads(k["ids"], k["tokens"], k["grads"], k["contributions"])
    main = sort({key: joined[key] for key in ("sample_ids", "tokens", "losses", "groups")}, joined["sample_ids"])
    return dataclasses.replace(fisher, sample_ids=main["sample_ids"], tokens=main["tokens"], losses=main["losses"],
                               per_sample_groups=main["groups"], sample_grads=kept,
                               skipped_ids=tuple(sorted(int(i) for i in skipped)))
