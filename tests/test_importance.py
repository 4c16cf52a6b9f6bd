"""Phase 2 (importance): shares, rankings, head importance and task comparison against numpy loops."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fisherjax.analysis import importance
from fisherjax.errors import DataError, NumericalError
from fisherjax.fisher.groups import group_sizes, groups_of_elementwise
from fisherjax.fisher.state import TaskFisher
from fisherjax.layout import ModelLayout, Role

from conftest import abstract_layout, tiny_config

HD = 8


def config(family: str):
    return tiny_config(family, vocab_size=61, num_layers=3, intermediate_size=24, head_dim=HD)


def layout_of(family: str) -> ModelLayout:
    return abstract_layout(config(family))


def random_fisher(layout: ModelLayout, task: str, seed: int, *, diagonal: bool = True) -> TaskFisher:
    """A TaskFisher whose group Fisher is the group sums of a random positive diagonal."""
    rng = np.random.default_rng(seed)
    diag = {p: rng.gamma(0.5, 1.0, size=s.shape) for p, s in layout.specs.items()}
    groups = {p: {k: np.asarray(v) for k, v in groups_of_elementwise(layout, p, d).items()} for p, d in diag.items()}
    sizes = {p: group_sizes(layout, p) for p in diag}
    return TaskFisher(task, groups, sizes, n_samples=10, diagonal=diag if diagonal else None)


@pytest.fixture(scope="module")
def layouts():
    return {f: layout_of(f) for f in ("llama", "gpt2", "gpt_neox")}


# ---- references written with plain loops ----------------------------------------------------


def head_columns(layout: ModelLayout, path: str, block: str, h: int) -> slice | np.ndarray:
    """Output columns of (block, head h) in a Q/K/V kernel or bias, by hand."""
    spec = layout.spec(path)
    H, Hkv = layout.num_heads, layout.num_kv_heads
    if spec.role != Role.QKV:
        return slice(h * HD, (h + 1) * HD)
    if spec.fused == "gpt2":
        start = {"q": 0, "k": H * HD, "v": (H + Hkv) * HD}[block]
        return slice(start + h * HD, start + (h + 1) * HD)
    offset = "qkv".index(block)
    return slice(h * 3 * HD + offset * HD, h * 3 * HD + (offset + 1) * HD)


def reference_blocks(layout: ModelLayout, diag) -> dict[str, np.ndarray]:
    """Per-block head Fisher [L, heads] by looping over layers and heads."""
    L = layout.num_layers
    out = {}
    for block in "qkvo":
        heads = layout.heads_of(block)
        values = np.zeros((L, heads))
        for kind in ("kernel", "bias"):
            for path in layout.block_sources(block, kind) if (block, kind) in layout.attention_blocks() else []:
                d = diag[path]
                for layer in range(L):
                    for h in range(heads):
                        if block == "o":
                            values[layer, h] += d[layer, h * HD : (h + 1) * HD, :].sum()
                        else:
                            values[layer, h] += d[layer, ..., head_columns(layout, path, block, h)].sum()
        out[block] = values
    return out


# ---- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_shares_match_numpy(layouts, family):
    layout = layouts[family]
    fisher = random_fisher(layout, "a", 0)
    table = importance.group_table(fisher, layout)
    diag = fisher.diagonal
    # Totals from the diagonal itself: the trace, and the sum over each layer's slice of every stacked leaf.
    trace = sum(d.sum() for d in diag.values())
    per_layer = {layer: sum(d[layer].sum() for p, d in diag.items() if layout.spec(p).layered) for layer in range(layout.num_layers)}
    per_layer[-1] = sum(d.sum() for p, d in diag.items() if not layout.spec(p).layered)
    for i in range(len(table)):
        path, group_type, layer, index = table.path[i], table.group_type[i], table.layer[i], table.index[i]
        d = diag[path] if layer < 0 else diag[path][layer]
        spec = layout.spec(path)
        if group_type in ("head", "head_q", "head_k", "head_v"):
            block = group_type[-1] if spec.role == Role.QKV else spec.role.value
            expected = d[index * HD : (index + 1) * HD].sum() if block == "o" else d[..., head_columns(layout, path, block, index)].sum()
        elif group_type == "channel":
            expected = d[:, index].sum()
        elif group_type == "neuron":
            expected = d[index, :].sum()
        elif group_type == "row":
            expected = d[index].sum() if spec.kind == "embedding" else d[:, index].sum()
        else:
            expected = d.reshape(-1)[index]
        np.testing.assert_allclose(table.value[i], expected, rtol=1e-10, err_msg=f"{path} {group_type} {layer} {index}")
        np.testing.assert_allclose(table.global_share[i], expected / trace, rtol=1e-10)
        np.testing.assert_allclose(table.layer_share[i], expected / per_layer[layer], rtol=1e-10)
    primary = table.where(primary_only=True)
    np.testing.assert_allclose(primary.global_share.sum(), 1.0, rtol=1e-12)
    for layer in [-1, *range(layout.num_layers)]:
        np.testing.assert_allclose(primary.where(layer=layer).layer_share.sum(), 1.0, rtol=1e-12)
    # The MLP out kernel's neuron view is not primary (its channel view is).
    assert not table.where(group_type="neuron").primary.any()


def test_layer_totals(layouts):
    layout = layouts["llama"]
    fisher = random_fisher(layout, "a", 1)
    totals = importance.layer_totals(importance.group_table(fisher, layout))
    assert totals.layers.tolist() == [-1, 0, 1, 2]
    for row, layer in enumerate(totals.layers):
        for col, role in enumerate(totals.roles):
            expected = sum(
                (d.sum() if layer < 0 else d[layer].sum())
                for p, d in fisher.diagonal.items()
                if layout.spec(p).role.value == role and layout.spec(p).layered == (layer >= 0)
            )
            np.testing.assert_allclose(totals.by_role[row, col], expected, rtol=1e-10)
    np.testing.assert_allclose(totals.share.sum(), 1.0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_head_importance_matches_loops(layouts, family):
    layout = layouts[family]
    fisher = random_fisher(layout, "a", 2)
    heads = importance.head_importance(fisher, layout)
    ref = reference_blocks(layout, fisher.diagonal)
    for block in "qkvo":
        np.testing.assert_allclose(heads.blocks[block], ref[block], rtol=1e-10)
    H, G = layout.num_heads, layout.kv_groups
    L = layout.num_layers
    head = np.zeros((L, H))
    kv_head = np.zeros((L, layout.num_kv_heads))
    for layer in range(L):
        for h in range(H):
            j = h // G
            head[layer, h] = ref["q"][layer, h] + ref["o"][layer, h] + (ref["k"][layer, j] + ref["v"][layer, j]) / G
            kv_head[layer, j] += ref["q"][layer, h] + ref["o"][layer, h]
        kv_head[layer] += ref["k"][layer] + ref["v"][layer]
    np.testing.assert_allclose(heads.head, head, rtol=1e-10)
    np.testing.assert_allclose(heads.kv_head, kv_head, rtol=1e-10)
    # Heads partition the attention Fisher (output bias excepted).
    attention = sum(ref[b].sum() for b in "qkvo")
    np.testing.assert_allclose(heads.head.sum(), attention, rtol=1e-10)
    np.testing.assert_allclose(heads.kv_head.sum(), attention, rtol=1e-10)


def test_top_k_names_the_planted_head(layouts):
    layout = layouts["llama"]
    fisher = random_fisher(layout, "a", 3)
    q_path = "layers/self_attn/q_proj/kernel"
    planted = {p: dict(g) for p, g in fisher.group_fisher.items()}
    planted[q_path]["head"] = planted[q_path]["head"].copy()
    planted[q_path]["head"][2, 3] = 1e6
    table = importance.group_table(TaskFisher("a", planted, fisher.group_sizes, n_samples=10), layout)
    top = table.top(5).rows()
    assert (top[0]["path"], top[0]["role"], top[0]["layer"], top[0]["index"]) == (q_path, "q", 2, 3)
    order = np.argsort(-table.global_share, kind="stable")[:5]
    np.testing.assert_allclose([r["global_share"] for r in top], table.global_share[order])
    by_layer = table.top(3, "layer_share")
    assert np.all(np.diff(by_layer.layer_share) <= 0)
    assert table.where(role="q", layer=2).index.tolist() == [0, 1, 2, 3]


def test_fused_roles_are_split(layouts):
    table = importance.group_table(random_fisher(layouts["gpt2"], "a", 4), layouts["gpt2"])
    c_attn = table.where(group_type=["head_q", "head_k", "head_v"])
    assert set(c_attn.role) == {"q", "k", "v"}


def rank_correlation(x, y):
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return np.corrcoef(rx, ry)[0, 1]


def test_compare_tasks(layouts):
    layout = layouts["llama"]
    a, b = random_fisher(layout, "a", 5), random_fisher(layout, "b", 6)
    result = importance.compare_tasks(a, b, layout, k=7)
    ta = importance.group_table(a, layout).where(primary_only=True)
    tb = importance.group_table(b, layout).where(primary_only=True)
    assert result.n_groups == len(ta)
    np.testing.assert_allclose(result.spearman, rank_correlation(ta.global_share, tb.global_share), rtol=1e-10)
    diff = ta.global_share - tb.global_share
    top = np.argsort(-np.abs(diff))[:7]
    np.testing.assert_allclose([r["difference"] for r in result.differences], diff[top], rtol=1e-10)
    assert result.differences[0]["path"] == ta.path[top[0]]
    q = ta.role == "q"
    np.testing.assert_allclose(result.by_role["q"][0], rank_correlation(ta.global_share[q], tb.global_share[q]), rtol=1e-10)
    same = importance.compare_tasks(a, a, layout)
    assert same.spearman == pytest.approx(1.0)
    assert all(r["difference"] == 0 for r in same.differences)


def test_compare_tasks_with_different_parameters(layouts):
    layout = layouts["llama"]
    a, b = random_fisher(layout, "a", 7), random_fisher(layout, "b", 8)
    fewer = TaskFisher(
        "b",
        {p: g for p, g in b.group_fisher.items() if p != "embed/embedding"},
        {p: g for p, g in b.group_sizes.items() if p != "embed/embedding"},
        n_samples=10,
    )
    with pytest.raises(DataError, match="embed/embedding"):
        importance.compare_tasks(a, fewer, layout)
    result = importance.compare_tasks(a, fewer, layout, intersect=True)
    assert result.n_groups == len(importance.group_table(fewer, layout).where(primary_only=True))
    assert "embed/embedding" not in set(result.table_a.path)


def test_degenerate_fisher(layouts):
    layout = layouts["llama"]
    fisher = random_fisher(layout, "a", 9, diagonal=False)
    zero = TaskFisher("z", {p: {k: np.zeros_like(v) for k, v in g.items()} for p, g in fisher.group_fisher.items()}, fisher.group_sizes, n_samples=3)
    with pytest.raises(NumericalError, match="zero everywhere"):
        importance.group_table(zero, layout)
    nan = {p: dict(g) for p, g in fisher.group_fisher.items()}
    nan["final_norm/scale"] = {"element": np.full(32, np.nan)}
    with pytest.raises(NumericalError, match="final_norm/scale"):
        importance.group_table(TaskFisher("n", nan, fisher.group_sizes, n_samples=3), layout)
    unknown = {**fisher.group_fisher, "extra/kernel": {"channel": np.ones(3)}}
    with pytest.raises(DataError, match="extra/kernel"):
        importance.group_table(TaskFisher("u", unknown, fisher.group_sizes, n_samples=3), layout)
    # A layer whose Fisher is exactly zero gets shares 0 there, not NaN.
    dead = {p: {k: (np.where(np.arange(v.shape[0]).reshape((-1,) + (1,) * (v.ndim - 1)) == 1, 0.0, v) if layout.spec(p).layered else v) for k, v in g.items()} for p, g in fisher.group_fisher.items()}
    table = importance.group_table(TaskFisher("d", dead, fisher.group_sizes, n_samples=3), layout)
    assert np.all(table.where(layer=1).layer_share == 0)
    assert np.all(np.isfinite(table.layer_share))
    # Constant importances have no ranking to correlate.
    flat = {p: {k: np.ones_like(v) for k, v in g.items()} for p, g in fisher.group_fisher.items()}
    with pytest.raises(NumericalError, match="no ranking"):
        importance.compare_tasks(TaskFisher("c", flat, fisher.group_sizes, n_samples=3), fisher, layout, by="value")
    missing_q = {p: g for p, g in fisher.group_fisher.items() if "q_proj" not in p}
    with pytest.raises(DataError, match="q_proj"):
        importance.head_importance(TaskFisher("m", missing_q, fisher.group_sizes, n_samples=3), layout)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_spread_groups_round_trips_through_groups(layouts, family):
    """Spreading values v over a leaf's groups and summing each group again gives v · |g|."""
    layout = layouts[family]
    rng = np.random.default_rng(10)
    for path in layout.specs:
        sizes = group_sizes(layout, path)
        for group_type, size in sizes.items():
            values = rng.random(size.shape)
            spread = importance.spread_groups(layout, path, {group_type: values})
            assert spread.shape == layout.spec(path).shape
            again = groups_of_elementwise(layout, path, np.asarray(spread, np.float64))[group_type]
            np.testing.assert_allclose(again, values * size, rtol=1e-12, err_msg=f"{path} {group_type}")


def test_spread_heads_by_hand(layouts):
    layout = layouts["gpt_neox"]
    path = "layers/attention/query_key_value/kernel"
    values = np.arange(12.0).reshape(3, 4)
    spread = importance.spread_groups(layout, path, {"head_k": values}, fill=-1)
    for layer in range(3):
        for h in range(4):
            assert np.all(spread[layer][:, head_columns(layout, path, "k", h)] == values[layer, h])
            assert np.all(spread[layer][:, head_columns(layout, path, "q", h)] == -1)
    o_path = "layers/attention/dense/kernel"
    spread = importance.spread_groups(layout, o_path, {"head": values})
    for h in range(4):
        assert np.all(spread[:, h * HD : (h + 1) * HD, :] == values[:, h, None, None])
    # Leading axes pass through.
    stacked = importance.spread_groups(layout, o_path, {"head": np.stack([values, -values])})
    assert stacked.shape == (2, *layout.spec(o_path).shape)
    np.testing.assert_array_equal(stacked[1], -spread)


def test_spread_bucketed_rows():
    rows = 50_500
    layout = ModelLayout.from_rules(
        {"embed": {"embedding": np.zeros((rows, 2), np.float32)}}, [(r"embed/embedding", Role.EMBED)], num_heads=1, head_dim=2
    )
    buckets = np.arange(51.0)
    spread = importance.spread_groups(layout, "embed/embedding", {"row": buckets})
    assert spread.shape == (rows, 2)
    np.testing.assert_array_equal(spread[:, 0], np.arange(rows) // 1000)


def test_summarize_and_plot(layouts, tmp_path):
    layout = layouts["llama"]
    a, b = random_fisher(layout, "a", 11), random_fisher(layout, "b", 12)
    from fisherjax.report import importance as importance_report

    summary = importance_report.summary([a, b], layout, k=4)
    json.dumps(summary)
    assert set(summary["tasks"]) == {"a", "b"} and "a|b" in summary["comparisons"]
    assert len(summary["tasks"]["a"]["top_groups"]) == 4
    assert np.asarray(summary["tasks"]["a"]["heads"]["head"]).shape == (3, 4)
    heads = [importance.head_importance(f, layout) for f in (a, b)]
    fig = importance_report.figure(heads)
    assert len(fig.axes) == 2 * 5 * 2  # panels and their colour bars
    fig.savefig(tmp_path / "heads.png")
    assert (tmp_path / "heads.png").stat().st_size > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_importance_intervals_bootstrap_each_samples_heads(layouts, family):
    """The interval of F_head is the percentile bootstrap of the mean of each sample's own F_head
    (F_head is linear in the block values), recomputed here sample by sample with head_importance."""
    layout = layouts[family]
    samples = [random_fisher(layout, "s", 100 + i, diagonal=False) for i in range(7)]
    per_sample = {p: {g: np.stack([f.group_fisher[p][g] for f in samples]) for g in samples[0].group_fisher[p]} for p in samples[0].group_fisher}
    mean = {p: {g: v.mean(0) for g, v in groups.items()} for p, groups in per_sample.items()}
    fisher = TaskFisher("t", mean, samples[0].group_sizes, n_samples=7, per_sample_groups=per_sample)
    low, high = importance.head_importance_intervals(fisher, layout, n_bootstrap=300, seed=4)
    each = np.stack([importance.head_importance(f, layout).head for f in samples])  # [n, L, H]
    draws = np.random.default_rng(4).integers(0, 7, size=(300, 7))  # fisherjax.stats.bootstrap_indices
    replicates = each[draws].mean(1)
    np.testing.assert_allclose(low, np.quantile(replicates, 0.025, axis=0), rtol=1e-9)
    np.testing.assert_allclose(high, np.quantile(replicates, 0.975, axis=0), rtol=1e-9)
    head = importance.head_importance(fisher, layout).head
    assert np.all(low <= head * (1 + 1e-12)) and np.all(head <= high * (1 + 1e-12))
