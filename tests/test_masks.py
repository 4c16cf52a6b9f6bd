"""Phase 3 (pruning masks): thresholds, exact sparsity, params-shaped trees built by hand, and
the head-pruning experiment on a tiny random Llama with grouped-query attention."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fisherjax.analysis import _ranking, experiments, masks
from fisherjax.data import batches, task_from_tokens
from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.fisher.groups import group_sizes, groups_of_elementwise
from fisherjax.fisher.state import TaskFisher
from fisherjax.layout import ModelLayout, flatten

from conftest import abstract_layout, tiny_config

HD = 8
VOCAB = 61


def config(family: str, layers: int = 3):
    return tiny_config(family, vocab_size=VOCAB, num_layers=layers, intermediate_size=24, head_dim=HD)


def layout_of(family: str) -> ModelLayout:
    return abstract_layout(config(family))


def fisher_from_diagonal(layout: ModelLayout, task: str, diag) -> TaskFisher:
    groups = {p: {k: np.asarray(v) for k, v in groups_of_elementwise(layout, p, np.asarray(d, np.float64)).items()} for p, d in diag.items()}
    return TaskFisher(task, groups, {p: group_sizes(layout, p) for p in diag}, n_samples=8, diagonal=diag)


def random_fisher(layout: ModelLayout, task: str, seed: int) -> TaskFisher:
    rng = np.random.default_rng(seed)
    return fisher_from_diagonal(layout, task, {p: rng.gamma(0.5, 1.0, size=s.shape) for p, s in layout.specs.items()})


@pytest.fixture(scope="module")
def layouts():
    return {f: layout_of(f) for f in ("llama", "gpt2", "gpt_neox")}


# ---- thresholds ------------------------------------------------------------------------------


def reference_keep(scores, groups, sparsity):
    """Per group: prune the k = floor(s·n + 1/2) smallest (distinct) scores, with a sort per group."""
    keep = np.ones(len(scores), bool)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        k = int(np.floor(sparsity * len(idx) + 0.5))
        if k:
            threshold = np.sort(scores[idx])[k - 1]
            keep[idx] = scores[idx] > threshold
    return keep


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.9, 1.0])
def test_keep_highest_matches_sorting(sparsity):
    rng = np.random.default_rng(0)
    scores = rng.random(300)
    groups = rng.integers(0, 5, 300)
    np.testing.assert_array_equal(masks.keep_highest(scores, groups, sparsity), reference_keep(scores, groups, sparsity))
    global_keep = masks.keep_highest(scores, np.zeros(300, int), sparsity)
    k = int(np.floor(sparsity * 300 + 0.5))
    assert (~global_keep).sum() == k
    if 0 < k < 300:
        # The quantile threshold: numpy's 'lower' quantile at k/n is the k-th smallest score.
        np.testing.assert_array_equal(global_keep, scores > np.quantile(scores, k / 300, method="lower"))


LEVELS = (0.0, 0.1, 0.5, 0.9, 1.0)


@pytest.mark.parametrize("n_groups", [1, 3, 40])
def test_selection_and_sorting_prune_the_same_parameters_at_every_level(n_groups):
    """Large diagonals are pruned by selection per group, small ones by one stable sort, every
    sparsity level from one ranking: the same masks as one level at a time, including ties at the
    threshold (scores from 50 values) and flat groups."""
    rng = np.random.default_rng(n_groups)
    scores = rng.integers(0, 50, 5000).astype(np.float32)
    groups = rng.integers(0, n_groups, 5000)
    by_sorting, _ = _ranking.pruned_by_sorting(scores, groups, LEVELS)
    by_selection, _ = _ranking.pruned_by_selection(scores, groups, LEVELS)
    np.testing.assert_array_equal(by_selection, by_sorting)
    for level, sparsity in enumerate(LEVELS):
        expected_keep = reference_keep(scores, groups, sparsity) | _tie_survivors(scores, groups, sparsity)
        np.testing.assert_array_equal(~by_sorting[level], expected_keep)
        np.testing.assert_array_equal(masks.keep_highest(scores, groups, sparsity), expected_keep)
    flat = np.where(groups == 0, 7.0, scores)
    assert bool(_ranking.pruned_by_sorting(flat, groups, (0.5,))[1]) == bool(_ranking.pruned_by_selection(flat, groups, (0.5,))[1])
    with pytest.raises(NumericalError, match="all equal"):  # a level that splits the flat group is enough
        masks.keep_highest_each(np.where(groups == 0, 7.0, scores), groups, (0.0, 0.5))


def _tie_survivors(scores, groups, sparsity):
    """Scores equal to their group's threshold that survive because earlier ties were pruned first."""
    keep = np.zeros(len(scores), bool)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        k = int(np.floor(sparsity * len(idx) + 0.5))
        if 0 < k < len(idx):
            threshold = np.sort(scores[idx])[k - 1]
            ties = idx[scores[idx] == threshold]
            keep[ties[k - int((scores[idx] < threshold).sum()):]] = True
    return keep


def test_ties_and_degenerate_scores():
    scores = np.array([1.0, 2.0, 2.0, 2.0, 3.0, 4.0])
    keep = masks.keep_highest(scores, np.zeros(6, int), 0.5)
    assert (~keep).sum() == 3  # exact count even with ties at the threshold
    np.testing.assert_array_equal(keep, [False, False, False, True, True, True])  # ties broken by position
    with pytest.raises(NumericalError, match="all equal"):
        masks.keep_highest(np.zeros(6), np.zeros(6, int), 0.5)
    assert masks.keep_highest(np.zeros(6), np.zeros(6, int), 0.0).all()
    assert not masks.keep_highest(np.zeros(6), np.zeros(6, int), 1.0).any()
    # One group per layer: round half up prunes it at s = 0.5, keeps it below.
    assert not masks.keep_highest(np.array([1.0, 2.0]), np.array([0, 1]), 0.5).any()
    assert masks.keep_highest(np.array([1.0, 2.0]), np.array([0, 1]), 0.49).all()
    with pytest.raises(ConfigError, match="sparsity"):
        masks.keep_highest(scores, np.zeros(6, int), 1.5)
    with pytest.raises(NumericalError, match="NaN"):
        masks.keep_highest(np.array([np.nan, 1.0]), np.zeros(2, int), 0.5)


# ---- structured masks built by hand ------------------------------------------------------------


def head_cols(layout: ModelLayout, path: str, block: str, h: int) -> slice:
    spec = layout.spec(path)
    H, Hkv = layout.num_heads, layout.num_kv_heads
    if spec.fused == "gpt2":
        start = {"q": 0, "k": H * HD, "v": (H + Hkv) * HD}[block]
        return slice(start + h * HD, start + (h + 1) * HD)
    if spec.fused == "neox":
        offset = "qkv".index(block)
        return slice(h * 3 * HD + offset * HD, h * 3 * HD + (offset + 1) * HD)
    return slice(h * HD, (h + 1) * HD)


def reference_head_tree(layout: ModelLayout, head_keep: np.ndarray) -> dict:
    """Flat bool tree with pruned heads' slices set False by hand (GQA: a kv head goes when all its heads go)."""
    tree = {p: np.ones(s.shape, bool) for p, s in layout.specs.items()}
    G = layout.kv_groups
    for layer, h in zip(*np.nonzero(~head_keep), strict=True):
        for path, spec in layout.specs.items():
            name = spec.role.value
            if name in ("q", "qkv"):
                tree[path][layer][..., head_cols(layout, path, "q", h)] = False
            if name == "o" and spec.kind == "kernel":
                tree[path][layer][h * HD : (h + 1) * HD, :] = False
        j = h // G
        if not head_keep[layer, j * G : (j + 1) * G].any():
            for path, spec in layout.specs.items():
                for block in "kv":
                    if spec.role.value in (block, "qkv"):
                        tree[path][layer][..., head_cols(layout, path, block, j)] = False
    return tree


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_head_mask_tree_by_hand(layouts, family, scope):
    layout = layouts[family]
    fisher = random_fisher(layout, "a", 1)
    mask = masks.structured_mask(fisher, layout, 0.5, unit="head", scope=scope)
    keep = mask.keep["head"]
    assert keep.shape == (3, 4)
    assert mask.n_pruned == 6
    if scope == "layer":
        assert ((~keep).sum(1) == 2).all()
    scores = mask.scores["head"]
    # Every pruned head scores no higher than every kept head (per layer for the layer scope).
    if scope == "global":
        assert scores[~keep].max() <= scores[keep].min()
    else:
        assert all(scores[layer][~keep[layer]].max() <= scores[layer][keep[layer]].min() for layer in range(3))
    flat = flatten(mask.tree)
    ref = reference_head_tree(layout, keep)
    assert set(flat) == set(ref)
    for path in ref:
        np.testing.assert_array_equal(flat[path], ref[path], err_msg=path)


def test_gqa_kv_head_pruned_only_with_all_its_heads(layouts):
    layout = layouts["llama"]
    keep = np.ones((3, 4), bool)
    keep[0, [0, 1]] = False  # all query heads of kv head 0 in layer 0
    keep[1, [0, 2]] = False  # one query head of each kv head in layer 1
    tree = flatten(masks.mask_tree(layout, "head", {"head": keep}))
    k = tree["layers/self_attn/k_proj/kernel"]
    assert not k[0][:, :HD].any() and k[0][:, HD:].all()
    assert k[1].all() and k[2].all()
    # kv_head unit: GQA group j removes kv head j and its query heads.
    kv_keep = np.array([[False, True], [True, True], [True, False]])
    tree = flatten(masks.mask_tree(layout, "kv_head", {"kv_head": kv_keep}))
    ref = reference_head_tree(layout, kv_keep[:, layout.kv_head_of])
    for path in ref:
        np.testing.assert_array_equal(tree[path], ref[path], err_msg=path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_neuron_and_channel_masks_by_hand(layouts, family):
    layout = layouts[family]
    fisher = random_fisher(layout, "a", 2)
    mask = masks.structured_mask(fisher, layout, 0.7, unit="neuron", scope="layer")
    keep = mask.keep["neuron"]
    assert keep.shape == (3, 24) and ((~keep).sum(1) == 17).all()
    names = {"llama": ("layers/mlp/up_proj", "layers/mlp/gate_proj", "layers/mlp/down_proj"), "gpt2": ("layers/mlp/c_fc", None, "layers/mlp/c_proj")}[family]
    up, gate, down = names
    diag = fisher.diagonal
    score = diag[f"{up}/kernel"].sum(1) + diag[f"{down}/kernel"].sum(2)
    if gate:
        score = score + diag[f"{gate}/kernel"].sum(1)
    if family == "gpt2":
        score = score + diag[f"{up}/bias"]
    np.testing.assert_allclose(mask.scores["neuron"], score, rtol=1e-10)
    flat = flatten(mask.tree)
    for layer in range(3):
        np.testing.assert_array_equal(flat[f"{up}/kernel"][layer], np.broadcast_to(keep[layer], (32, 24)))
        np.testing.assert_array_equal(flat[f"{down}/kernel"][layer], np.broadcast_to(keep[layer][:, None], (24, 32)))
        if gate:
            np.testing.assert_array_equal(flat[f"{gate}/kernel"][layer], np.broadcast_to(keep[layer], (32, 24)))
        if family == "gpt2":
            np.testing.assert_array_equal(flat[f"{up}/bias"][layer], keep[layer])
            assert flat[f"{down}/bias"].all()
    assert flat["layers/attn/c_attn/kernel" if family == "gpt2" else "layers/self_attn/q_proj/kernel"].all()
    channel = masks.structured_mask(fisher, layout, 0.5, unit="channel")
    total = sum(k.size for k in channel.keep.values())
    assert channel.n_pruned == int(np.floor(0.5 * total + 0.5))
    cflat = flatten(channel.tree)
    for path, k in channel.keep.items():
        np.testing.assert_array_equal(cflat[path], np.broadcast_to(k[:, None, :], layout.spec(path).shape))


def test_unstructured_mask_exact(layouts):
    layout = layouts["llama"]
    fisher = random_fisher(layout, "a", 3)
    n = sum(s.size for s in fisher.diagonal.values())
    for sparsity in (0.0, 0.5, 0.7, 0.9, 1.0):
        mask = masks.unstructured_mask(fisher, layout, sparsity)
        pruned = sum(int((~np.asarray(x)).sum()) for x in jax.tree.leaves(mask.tree))
        assert pruned == int(np.floor(sparsity * n + 0.5))
        assert abs(mask.param_sparsity - sparsity) <= 0.5 / n
    mask = masks.unstructured_mask(fisher, layout, 0.5)
    values = np.concatenate([d.reshape(-1) for d in fisher.diagonal.values()])
    threshold = np.sort(values)[int(np.floor(0.5 * n + 0.5)) - 1]
    for path, keep in flatten(mask.tree).items():
        np.testing.assert_array_equal(keep, fisher.diagonal[path] > threshold)
    levels = masks.unstructured_masks(fisher, layout, (0.9, 0.5), scope="global")
    for level in levels:
        single = masks.unstructured_mask(fisher, layout, level.target_sparsity)
        for path in single.keep:
            np.testing.assert_array_equal(level.keep[path], single.keep[path])
    per_layer = masks.unstructured_mask(fisher, layout, 0.7, scope="layer")
    stats = masks.sparsity_stats(per_layer, layout)
    assert stats.layers.tolist() == [-1, 0, 1, 2]
    for layer, pruned, total in zip(stats.layers, stats.pruned, stats.total, strict=True):
        expected_total = sum((d.size if layer < 0 else d[0].size) for p, d in fisher.diagonal.items() if layout.spec(p).layered == (layer >= 0))
        assert total == expected_total and pruned == int(np.floor(0.7 * total + 0.5))
    no_diag = TaskFisher("a", fisher.group_fisher, fisher.group_sizes, n_samples=8)
    with pytest.raises(DataError, match="diagonal"):
        masks.unstructured_mask(no_diag, layout, 0.5)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_float32_diagonals_are_ranked_leaf_by_leaf_as_if_joined(layouts, scope, monkeypatch):
    """A float32 diagonal (as collect stores it) is ranked without joining its leaves: the masks
    equal keep_highest_each on the joined scores — ties at the threshold (values on a grid of
    quarters, and zeros) pruned earliest first in leaf order — at every level, in either scope."""
    layout = layouts["gpt2"]
    base = random_fisher(layout, "a", 5)
    diagonal = {p: (np.round(np.asarray(v) * 4) / 4).astype(np.float32) for p, v in base.diagonal.items()}
    fisher = TaskFisher("a", base.group_fisher, base.group_sizes, n_samples=8, diagonal=diagonal)
    paths = [p for p in layout.specs if p in diagonal]
    joined = np.concatenate([diagonal[p].reshape(-1) for p in paths])
    labels = (np.concatenate([np.repeat(ids, rows.shape[1]) for rows, ids in (layout.layer_rows(p, diagonal[p]) for p in paths)])
              if scope == "layer" else np.zeros(len(joined), np.int8))
    sparsities = (0.0, 0.3, 0.5, 0.9, 1.0)
    want = masks.keep_highest_each(joined, labels, sparsities)
    monkeypatch.setattr(masks, "keep_highest_each", lambda *a, **k: pytest.fail("the joined route was taken"))
    got = masks.unstructured_masks(fisher, layout, sparsities, scope=scope)
    for level, expected in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.concatenate([level.keep[p].reshape(-1) for p in paths]), expected)
        np.testing.assert_array_equal(np.concatenate([np.asarray(flatten(level.tree)[p]).reshape(-1) for p in paths]), expected)
    flat = TaskFisher("a", base.group_fisher, base.group_sizes, n_samples=8,
                      diagonal={p: np.zeros(v.shape, np.float32) for p, v in diagonal.items()})
    with pytest.raises(NumericalError, match="all equal"):
        masks.unstructured_masks(flat, layout, (0.5,), scope=scope)


def test_saliency_criterion(layouts):
    layout = layouts["llama"]
    fisher = random_fisher(layout, "a", 9)
    rng = np.random.default_rng(9)
    params = {p: rng.normal(size=s.shape) for p, s in layout.specs.items()}
    mask = masks.structured_mask(fisher, layout, 0.5, criterion="saliency", params=params)
    sal = {p: 0.5 * fisher.diagonal[p] * params[p] ** 2 for p in params}
    G = layout.kv_groups
    expected = np.zeros((3, 4))
    for layer in range(3):
        for h in range(4):
            j = h // G
            q = sal["layers/self_attn/q_proj/kernel"][layer][:, h * HD : (h + 1) * HD].sum()
            o = sal["layers/self_attn/o_proj/kernel"][layer][h * HD : (h + 1) * HD].sum()
            k = sal["layers/self_attn/k_proj/kernel"][layer][:, j * HD : (j + 1) * HD].sum()
            v = sal["layers/self_attn/v_proj/kernel"][layer][:, j * HD : (j + 1) * HD].sum()
            expected[layer, h] = q + o + (k + v) / G
    np.testing.assert_allclose(mask.scores["head"], expected, rtol=1e-10)
    with pytest.raises(ConfigError, match="params"):
        masks.structured_mask(fisher, layout, 0.5, criterion="saliency")
    no_diag = TaskFisher("a", fisher.group_fisher, fisher.group_sizes, n_samples=8)
    with pytest.raises(DataError, match="diagonal"):
        masks.structured_mask(no_diag, layout, 0.5, criterion="saliency", params=params)


def test_unstacked_layout_matches_stacked():
    """A model whose layers are separate leaves (``layers_<i>/...``) gets the same head and neuron masks."""
    from fisherjax.layout import Role

    rng = np.random.default_rng(11)
    d, H, Hkv, F = 16, 4, 2, 12
    shapes = {"q": (d, H * HD), "k": (d, Hkv * HD), "v": (d, Hkv * HD), "o": (H * HD, d), "up": (d, F), "gate": (d, F), "down": (F, d)}
    roles = {"q": Role.Q, "k": Role.K, "v": Role.V, "o": Role.O, "up": Role.MLP_IN, "gate": Role.MLP_GATE, "down": Role.MLP_OUT}
    diag = {name: rng.gamma(0.5, 1.0, (2, *shape)) for name, shape in shapes.items()}
    kw = dict(num_heads=H, num_kv_heads=Hkv, head_dim=HD)
    unstacked = ModelLayout.from_rules(
        {f"layers_{i}/{n}/kernel": np.zeros(s, np.float32) for i in range(2) for n, s in shapes.items()},
        [(rf"layers_(?P<layer>\d+)/{n}/kernel", r) for n, r in roles.items()],
        **kw,
    )
    stacked = ModelLayout.from_rules(
        {f"layers/{n}/kernel": np.zeros((2, *s), np.float32) for n, s in shapes.items()},
        [(rf"layers/{n}/kernel", r) for n, r in roles.items()],
        layered="layers/",
        **kw,
    )
    f_un = fisher_from_diagonal(unstacked, "a", {f"layers_{i}/{n}/kernel": diag[n][i] for i in range(2) for n in shapes})
    f_st = fisher_from_diagonal(stacked, "a", {f"layers/{n}/kernel": diag[n] for n in shapes})
    for unit in ("head", "kv_head", "neuron"):
        m_un = masks.structured_mask(f_un, unstacked, 0.5, unit=unit)
        m_st = masks.structured_mask(f_st, stacked, 0.5, unit=unit)
        np.testing.assert_array_equal(m_un.keep[unit], m_st.keep[unit])
        flat_un, flat_st = flatten(m_un.tree), flatten(m_st.tree)
        for name in shapes:
            for i in range(2):
                np.testing.assert_array_equal(flat_un[f"layers_{i}/{name}/kernel"], flat_st[f"layers/{name}/kernel"][i], err_msg=f"{unit} {name} {i}")


def test_apply_mask_and_stats(layouts):
    layout = layouts["gpt2"]
    rng = np.random.default_rng(4)
    params = {p: rng.normal(size=s.shape).astype(np.float32) for p, s in layout.specs.items()}
    from fisherjax.layout import unflatten

    nested = unflatten(params)
    mask = masks.structured_mask(random_fisher(layout, "a", 5), layout, 0.5, unit="head")
    masked = flatten(masks.apply_mask(nested, mask))
    for path, keep in flatten(mask.tree).items():
        np.testing.assert_array_equal(np.asarray(masked[path]), np.where(keep, params[path], 0.0))
    stats = masks.sparsity_stats(mask, layout)
    pruned_q = (~flatten(mask.tree)["layers/attn/c_attn/kernel"]).sum() + (~flatten(mask.tree)["layers/attn/c_attn/bias"]).sum()
    pruned_o = (~flatten(mask.tree)["layers/attn/c_proj/kernel"]).sum()
    assert stats.by_role["qkv"][0] == pruned_q and stats.by_role["o"][0] == pruned_o
    assert stats.pruned.sum() == pruned_q + pruned_o
    with pytest.raises(ConfigError, match="structure"):
        masks.apply_mask({"a": np.ones(3)}, mask)


def test_bad_choices(layouts):
    fisher = random_fisher(layouts["llama"], "a", 6)
    with pytest.raises(ConfigError, match="unit"):
        masks.structured_mask(fisher, layouts["llama"], 0.5, unit="row")
    with pytest.raises(ConfigError, match="scope"):
        masks.structured_mask(fisher, layouts["llama"], 0.5, scope="block")
    zero = TaskFisher("z", {p: {k: np.zeros_like(v) for k, v in g.items()} for p, g in fisher.group_fisher.items()}, fisher.group_sizes, n_samples=1)
    with pytest.raises(NumericalError, match="all equal"):
        masks.structured_mask(zero, layouts["llama"], 0.5)
    assert masks.structured_mask(zero, layouts["llama"], 0.0).n_pruned == 0
    assert masks.structured_mask(zero, layouts["llama"], 1.0).sparsity == 1.0


def test_summarize(layouts):
    layout = layouts["llama"]
    from fisherjax.report import masks as masks_report

    summary = masks_report.masks_summary({"a": random_fisher(layout, "a", 7), "b": random_fisher(layout, "b", 8)}, layout)
    json.dumps(summary)
    head = summary["tasks"]["a"]["head"]
    assert set(head) == {"0.5", "0.7", "0.9"}
    assert head["0.5"]["n_pruned"] == 6 and len(head["0.5"]["pruned_units"]) == 6
    assert summary["tasks"]["a"]["parameter"]["0.9"]["achieved_sparsity"] == pytest.approx(0.9, abs=1e-4)


# ---- head-pruning experiment on a tiny random Llama (GQA) ------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from fisherjax.grads import per_sample_grads
    from fisherjax.models import Model

    model = Model.init(config("llama", layers=2), seed=0)
    rng = np.random.default_rng(0)
    task_batches, fishers = {}, {}
    for name, low in (("low", 3), ("high", 30)):
        # Two token ranges, so the tasks lean on the model differently.
        tokens = [rng.integers(low, low + 28, size=rng.integers(6, 14)).tolist() for _ in range(8)]
        task = task_from_tokens(name, tokens)
        bs = list(batches(task, 8))  # one [8, 16] batch per task: one compilation serves both
        task_batches[name] = bs
        grads, counts = [], []
        for b in bs:
            ps = per_sample_grads(model, model.params, b, paths=list(model.layout.specs))
            real = b.sample_ids >= 0
            grads.append({p: np.asarray(g, np.float64)[real] for p, g in ps.grads.items()})
            counts.append(np.asarray(ps.tokens)[real])
        t = np.concatenate(counts).astype(np.float64)
        diag = {p: (np.concatenate([g[p] for g in grads]) ** 2 / t.reshape((-1,) + (1,) * (grads[0][p].ndim - 1))).mean(0) for p in grads[0]}
        fishers[name] = fisher_from_diagonal(model.layout, name, diag)
    return model, task_batches, fishers


def token_mean_loss(model, params, batch_list) -> float:
    """Σ token NLL / Σ tokens with numpy log-softmax of the model's logits."""
    total, count = 0.0, 0
    apply = jax.jit(model.apply)
    for b in batch_list:
        logits = np.asarray(apply(params, b.input_ids, b.attention_mask), np.float64)[:, :-1]
        targets = b.labels[:, 1:]
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        valid = targets != -100
        picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
        total += -(picked * valid).sum()
        count += valid.sum()
    return total / count


def test_head_pruning_experiment(tiny_llama):
    model, task_batches, fishers = tiny_llama
    result = experiments.head_pruning_experiment(model, model.params, task_batches, fishers, sparsity=0.5, n_random=3, seed=0)
    json.dumps(result)
    assert result["n_units"] == 8 and result["n_pruned"] == 4
    layout = model.layout
    for name, r in result["tasks"].items():
        np.testing.assert_allclose(r["loss_before"], token_mean_loss(model, model.params, task_batches[name]), rtol=1e-5)
        # Zero the pruned heads by hand (Q columns, O rows; a kv head only when both its query heads go).
        keep = np.ones((2, 4), bool)
        for layer, h in r["pruned"]:
            keep[layer, h] = False
        ref_tree = reference_head_tree(layout, keep)
        params = {p: np.where(ref_tree[p], np.asarray(v), 0.0).astype(np.float32) for p, v in flatten(model.params).items()}
        from fisherjax.layout import unflatten

        np.testing.assert_allclose(r["loss_fisher"], token_mean_loss(model, unflatten(params), task_batches[name]), rtol=1e-5)
        assert r["pruned"] == np.argwhere(~masks.structured_mask(fishers[name], layout, 0.5).keep["head"]).tolist()
        assert len(r["loss_random"]) == 3
        np.testing.assert_allclose(r["loss_random_mean"], np.mean(r["loss_random"]), rtol=1e-12)
        np.testing.assert_allclose(r["loss_random_sd"], np.std(r["loss_random"], ddof=1), rtol=1e-12)
        assert result["cross"][name][name] == r["loss_fisher"]
    with pytest.raises(DataError, match="batches"):
        experiments.head_pruning_experiment(model, model.params, {"low": task_batches["low"]}, fishers)


# ---- the shipped demo model ------------------------------------------------------------------


def fisher_from_per_sample_grads(model, task_batches, name: str) -> TaskFisher:
    """Empirical Fisher Î = mean_i g_i² / T_i over real samples, from ``per_sample_grads``."""
    from fisherjax.grads import per_sample_grads

    sums, n = None, 0
    for b in task_batches:
        ps = per_sample_grads(model, model.params, b, paths=list(model.layout.specs))
        real = (b.sample_ids >= 0) & (np.asarray(ps.tokens) > 0)
        t = np.asarray(ps.tokens, np.float64)[real]
        contrib = {p: (np.asarray(g, np.float64)[real] ** 2 / t.reshape((-1,) + (1,) * (g.ndim - 1))).sum(0) for p, g in ps.grads.items()}
        sums = contrib if sums is None else {p: sums[p] + contrib[p] for p in sums}
        n += int(real.sum())
    return fisher_from_diagonal(model.layout, name, {p: v / n for p, v in sums.items()})


@pytest.mark.slow
def test_demo_pruning_beats_random():
    """On the shipped demo model, pruning half of each layer's heads by saliency (``½ Σ Î θ²``, the
    estimated cost of zeroing them) hurts each task less than the random masks do on average and no
    more than the median random mask, on held-out samples. Copy cannot do without its induction head
    L1H0 (``tests/test_demo.py``): both criteria keep it.

    The plain Fisher criterion is not held to this on math: the demo was trained with head dropout,
    so layer 1's heads are nearly interchangeable by sensitivity (math's ``F_head`` of L1H0 is within
    6 % of the two heads it keeps) while zeroing L1H0 costs math ~4 nats; saliency, which weighs
    ``Î`` by ``θ²``, keeps it.
    """
    from fisherjax import demo

    model = demo.load()
    held_out, fishers = {}, {}
    for name, task in demo.load_tasks(model.tokenizer).items():
        fit_task, eval_task = task.split(0.5, seed=0)
        held_out[name] = list(batches(eval_task, 32, buckets=demo.EVAL_BUCKETS))
        fishers[name] = fisher_from_per_sample_grads(model, list(batches(fit_task, 32, buckets=demo.EVAL_BUCKETS)), name)
    results = {criterion: experiments.head_pruning_experiment(model, model.params, held_out, fishers, sparsity=0.5, n_random=20, seed=0,
                                                              scope="layer", criterion=criterion)
               for criterion in ("saliency", "fisher")}
    for name, r in results["saliency"]["tasks"].items():
        assert r["loss_before"] < r["loss_fisher"] < r["loss_random_mean"], (name, r)
        assert r["loss_fisher"] <= np.median(r["loss_random"]), (name, r)
    assert [1, 0] not in results["saliency"]["tasks"]["copy"]["pruned"]
    copy = results["fisher"]["tasks"]["copy"]
    assert [1, 0] not in copy["pruned"] and copy["loss_fisher"] <= np.median(copy["loss_random"]), copy


def test_mask_results_are_pytrees(layouts):
    """Masks, head importance and overlaps are data: tree_map reaches their arrays, labels stay."""
    import jax

    from fisherjax.analysis import importance, overlap

    layout = layouts["llama"]
    fa, fb = random_fisher(layout, "a", 3), random_fisher(layout, "b", 4)
    mask = masks.structured_mask(fa, layout, 0.5)
    flipped = jax.tree.map(lambda x: ~x if x.dtype == bool else x, mask)
    assert flipped.unit == "head" and flipped.task == "a"
    np.testing.assert_array_equal(flipped.keep["head"], ~mask.keep["head"])
    heads = importance.head_importance(fa, layout)
    assert jax.tree.map(lambda x: x * 0, heads).task == "a"
    o = overlap.mask_overlap(mask, masks.structured_mask(fb, layout, 0.5), layout)
    assert jax.tree.map(np.asarray, o).jaccard == o.jaccard
