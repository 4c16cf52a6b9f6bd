"""Phase 7: scale_by_fisher, EWC and Fisher merging against their closed forms in numpy."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest

from fisherjax.analysis import natural
from fisherjax.config import DecoderConfig
from fisherjax.errors import ConfigError, DataError, NumericalError
from fisherjax.fisher.groups import group_sizes, groups_of_elementwise
from fisherjax.fisher.state import TaskFisher
from fisherjax.layout import ModelLayout, flatten, layout_for, unflatten

HD = 8


def layout_of() -> ModelLayout:
    from flax import nnx

    from fisherjax.models.decoder import Decoder

    cfg = DecoderConfig(
        model_type="gpt2", family="gpt2", vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=HD, intermediate_size=24, max_position_embeddings=32, norm_eps=1e-5, activation="gelu_new",
        tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
    )
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0)))))
    return layout_for(cfg, jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract))


@pytest.fixture(scope="module")
def layout():
    return layout_of()


def random_tree(layout, seed, positive=False):
    rng = np.random.default_rng(seed)
    draw = (lambda s: rng.gamma(0.5, 1.0, s)) if positive else (lambda s: rng.normal(size=s))
    return unflatten({p: draw(s.shape).astype(np.float32) for p, s in layout.specs.items()})


def np_flat(tree):
    return {p: np.asarray(v, np.float64) for p, v in flatten(tree).items()}


# ---- scale_by_fisher ----------------------------------------------------------------------------


def quadratic_grads(params, target):
    """∇ of ½ Σ (θ − target)² per leaf, in numpy."""
    return {p: params[p] - target[p] for p in params}


def test_scale_by_fisher_two_steps(layout):
    params, target, fisher = random_tree(layout, 0), random_tree(layout, 1), random_tree(layout, 2, positive=True)
    eps, lr = 1e-3, 0.1
    opt = optax.chain(natural.scale_by_fisher(fisher, eps), optax.sgd(lr))
    state = opt.init(params)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p))
    theta = params
    ref = np_flat(params)
    t = np_flat(target)
    f = np_flat(fisher)
    for _ in range(2):
        grads = jax.tree.map(lambda p, q: p - q, theta, target)
        updates, state = step(grads, state, theta)
        theta = optax.apply_updates(theta, updates)
        g = quadratic_grads(ref, t)
        ref = {p: ref[p] - lr * g[p] / (f[p] + eps) for p in ref}
    for path, value in np_flat(theta).items():
        np.testing.assert_allclose(value, ref[path], rtol=2e-5, atol=2e-5, err_msg=path)
    # A flat {path: array} Fisher works the same.
    flat_opt = optax.chain(natural.scale_by_fisher(flatten(fisher), eps), optax.sgd(lr))
    g0 = jax.tree.map(lambda p, q: p - q, params, target)
    u_nested, _ = step(g0, opt.init(params), params)
    u_flat, _ = jax.jit(flat_opt.update)(g0, flat_opt.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, u_nested, u_flat)


def test_scale_by_fisher_errors(layout):
    fisher = random_tree(layout, 3, positive=True)
    with pytest.raises(ConfigError, match="eps"):
        natural.scale_by_fisher(fisher, 0.0)
    bad = flatten(fisher)
    bad["final_norm/scale"] = -np.ones(32, np.float32)
    with pytest.raises(NumericalError, match="final_norm/scale"):
        natural.scale_by_fisher(bad)
    partial = {k: v for k, v in flatten(fisher).items() if k != "final_norm/scale"}
    with pytest.raises(DataError, match="final_norm/scale"):
        natural.scale_by_fisher(partial).init(random_tree(layout, 4))


# ---- EWC ----------------------------------------------------------------------------------------


def test_ewc_penalty_and_gradient(layout):
    params, anchor, fisher = random_tree(layout, 5), random_tree(layout, 6), random_tree(layout, 7, positive=True)
    lam = 0.3
    p, a, f = np_flat(params), np_flat(anchor), np_flat(fisher)
    expected = lam / 2 * sum((f[k] * (p[k] - a[k]) ** 2).sum() for k in p)
    value, grad = jax.jit(jax.value_and_grad(natural.ewc_penalty))(params, anchor, fisher, lam)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    closed = {k: lam * f[k] * (p[k] - a[k]) for k in p}
    for k, g in np_flat(grad).items():
        np.testing.assert_allclose(g, closed[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The regulariser adds the same gradient to the updates; chained with SGD it steps on ∇(L + Ω).
    reg = natural.ewc_regulariser(anchor, fisher, lam)
    zeros = jax.tree.map(np.zeros_like, params)
    added, _ = jax.jit(reg.update)(zeros, reg.init(params), params)
    for k, g in np_flat(added).items():
        np.testing.assert_allclose(g, closed[k], rtol=1e-5, atol=1e-7, err_msg=k)
    lr = 0.05
    opt = optax.chain(natural.ewc_regulariser(anchor, fisher, lam), optax.sgd(lr))
    loss_grads = random_tree(layout, 8)
    updates, _ = jax.jit(opt.update)(loss_grads, opt.init(params), params)
    stepped = optax.apply_updates(params, updates)
    lg = np_flat(loss_grads)
    for k, v in np_flat(stepped).items():
        np.testing.assert_allclose(v, p[k] - lr * (lg[k] + closed[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(ConfigError, match="params"):
        reg.update(zeros, reg.init(params))
    with pytest.raises(ConfigError, match="λ"):
        natural.ewc_regulariser(anchor, fisher, -1.0)


# ---- merging ------------------------------------------------------------------------------------


def test_fisher_merge_matches_formula(layout):
    models = [random_tree(layout, s) for s in (10, 11, 12)]
    fishers = [random_tree(layout, s, positive=True) for s in (13, 14, 15)]
    flat_f = [np_flat(f) for f in fishers]
    flat_f[1]["layers/mlp/c_fc/kernel"] = np.zeros_like(flat_f[1]["layers/mlp/c_fc/kernel"])  # below the floor everywhere
    fishers[1] = unflatten({k: v.astype(np.float32) for k, v in flat_f[1].items()})
    floor, c = 1e-4, np.array([1.0, 2.0, 0.5])
    merged = natural.fisher_merge(models, fishers, floor=floor, coefficients=c)
    thetas = [np_flat(m) for m in models]
    for k, v in np_flat(merged).items():
        w = [c[i] * np.maximum(flat_f[i][k], floor) for i in range(3)]
        expected = sum(wi * t[k] for wi, t in zip(w, thetas, strict=True)) / sum(w)
        np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6, err_msg=k)
    assert jax.tree.structure(merged) == jax.tree.structure(models[0])
    # (Three models throughout, so one compilation serves the whole test.)
    # Identical models merge to themselves, whatever their Fisher.
    same = natural.fisher_merge([models[0]] * 3, fishers)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), y, rtol=1e-6, atol=1e-7), same, models[0])
    # All-zero Fisher: the floor makes it the coefficient-weighted mean.
    zero = jax.tree.map(np.zeros_like, fishers[0])
    mean = natural.fisher_merge(models, [zero] * 3, coefficients=c)
    jax.tree.map(lambda m, *t: np.testing.assert_allclose(np.asarray(m), sum(ci * ti for ci, ti in zip(c, t)) / c.sum(), rtol=1e-5, atol=1e-6), mean, *models)
    # Normalising scales each Fisher to unit sum: a Fisher times 1000 weighs as before.
    scaled = jax.tree.map(lambda x: 1000 * x, fishers[1])
    a = natural.fisher_merge(models, fishers, normalise=True, floor=1e-12)
    b = natural.fisher_merge(models, [fishers[0], scaled, fishers[2]], normalise=True, floor=1e-12)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6), a, b)


def test_fisher_merge_errors(layout):
    models = [random_tree(layout, s) for s in (20, 21)]
    fishers = [random_tree(layout, s, positive=True) for s in (22, 23)]
    with pytest.raises(ConfigError, match="2 models and 1"):
        natural.fisher_merge(models, fishers[:1])
    with pytest.raises(ConfigError, match="floor"):
        natural.fisher_merge(models, fishers, floor=0.0)
    fewer = unflatten({k: v for k, v in flatten(models[1]).items() if k != "final_norm/bias"})
    with pytest.raises(DataError, match="final_norm/bias"):
        natural.fisher_merge([models[0], fewer], fishers)
    partial_fisher = {k: v for k, v in flatten(fishers[1]).items() if k != "embed/embedding"}
    with pytest.raises(DataError, match="embed/embedding"):
        natural.fisher_merge(models, [fishers[0], partial_fisher])


def group_fisher_of(layout, diag, task):
    groups = {p: {k: np.asarray(v) for k, v in groups_of_elementwise(layout, p, np.asarray(d, np.float64)).items()} for p, d in flatten(diag).items()}
    return TaskFisher(task, groups, {p: group_sizes(layout, p) for p in groups}, n_samples=4)


def test_per_group_fisher_spreads_group_means(layout):
    diag = random_tree(layout, 30, positive=True)
    fisher = group_fisher_of(layout, diag, "a")
    per_param = np_flat(natural.parameter_fisher(fisher, layout))
    d = np_flat(diag)
    H = layout.num_heads
    c_attn = d["layers/attn/c_attn/kernel"]  # [L, d, (Q|K|V) heads · hd]
    for layer in range(2):
        for block in range(3):
            for h in range(H):
                cols = slice(block * H * HD + h * HD, block * H * HD + (h + 1) * HD)
                np.testing.assert_allclose(per_param["layers/attn/c_attn/kernel"][layer][:, cols], c_attn[layer][:, cols].mean(), rtol=1e-5)
        o = d["layers/attn/c_proj/kernel"][layer]
        for h in range(H):
            np.testing.assert_allclose(per_param["layers/attn/c_proj/kernel"][layer][h * HD : (h + 1) * HD], o[h * HD : (h + 1) * HD].mean(), rtol=1e-5)
        fc = d["layers/mlp/c_fc/kernel"][layer]
        np.testing.assert_allclose(per_param["layers/mlp/c_fc/kernel"][layer], np.broadcast_to(fc.mean(0), fc.shape), rtol=1e-5)
    np.testing.assert_allclose(per_param["embed/embedding"], np.broadcast_to(d["embed/embedding"].mean(1, keepdims=True), d["embed/embedding"].shape), rtol=1e-5)
    np.testing.assert_allclose(per_param["final_norm/scale"], d["final_norm/scale"], rtol=1e-6)
    # The bare group-Fisher mapping gives the same; a TaskFisher with a diagonal uses it ('auto').
    same = np_flat(natural.parameter_fisher(fisher.group_fisher, layout))
    for k in per_param:
        np.testing.assert_allclose(same[k], per_param[k], rtol=1e-6)
    with_diag = TaskFisher("a", fisher.group_fisher, fisher.group_sizes, n_samples=4, diagonal=flatten(diag))
    auto = np_flat(natural.parameter_fisher(with_diag, layout))
    for k in d:
        np.testing.assert_allclose(auto[k], d[k], rtol=1e-6)
    with pytest.raises(DataError, match="diagonal"):
        natural.parameter_fisher(fisher, layout, source="diagonal")
    # Merging with per-group Fisher: each parameter weighted by its group's mean Fisher.
    models = [random_tree(layout, s) for s in (31, 32, 34)]
    other = group_fisher_of(layout, random_tree(layout, 33, positive=True), "b")
    merged = np_flat(natural.fisher_merge(models, [fisher, other, fisher.group_fisher], layout=layout, floor=1e-12))
    fa, fb = per_param, np_flat(natural.parameter_fisher(other, layout))
    ta, tb, tc = (np_flat(m) for m in models)
    for k in merged:
        expected = (fa[k] * ta[k] + fb[k] * tb[k] + fa[k] * tc[k]) / (2 * fa[k] + fb[k])
        np.testing.assert_allclose(merged[k], expected, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("tally_elements", [None, 7])  # 7: every leaf tallied in several column blocks
def test_summarize(layout, tally_elements, monkeypatch):
    if tally_elements:
        monkeypatch.setattr(natural, "TALLY_ELEMENTS", tally_elements)
    fa = group_fisher_of(layout, random_tree(layout, 40, positive=True), "a")
    fb = group_fisher_of(layout, random_tree(layout, 41, positive=True), "b")
    from fisherjax.report import natural as natural_report

    summary = natural_report.summary({"a": fa, "b": fb}, layout)
    json.dumps(summary)
    pair = summary["merge_weights"]["a|b"]
    assert 0 < pair["mean_weight_a"] < 1
    assert pair["per_layer"]["layer"] == [-1, 0, 1]
    a, b = np_flat(natural.parameter_fisher(fa, layout)), np_flat(natural.parameter_fisher(fb, layout))
    w = np.concatenate([(np.maximum(a[k], 1e-8) / (np.maximum(a[k], 1e-8) + np.maximum(b[k], 1e-8))).reshape(-1) for k in a])
    assert pair["mean_weight_a"] == pytest.approx(w.mean(), rel=1e-6)
    assert pair["fraction_dominated_by_a"] == pytest.approx((w > 0.9).mean())
    joined = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in a.values()])
    assert list(summary["tasks"]["a"]["quantiles"].values()) == np.quantile(joined, [0, 0.01, 0.5, 0.99, 1]).tolist()
    assert summary["tasks"]["a"]["fraction_below_eps"] == (joined < 1e-8).mean()
    # Per layer, against weights labelled element by element (non-layer leaves are layer -1).
    label = np.concatenate([
        np.repeat(np.arange(a[k].shape[0]), a[k][0].size) if layout.spec(k).layered else np.full(a[k].size, -1) for k in a
    ])
    for i, layer in enumerate(pair["per_layer"]["layer"]):
        assert pair["per_layer"]["mean_weight_a"][i] == pytest.approx(w[label == layer].mean(), rel=1e-9)
        assert pair["per_layer"]["fraction_dominated_by_b"][i] == pytest.approx((w[label == layer] < 0.1).mean(), rel=1e-9)
