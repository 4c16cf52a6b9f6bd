"""Phase 1 against independent references: torch.func per-sample gradients on HF's models,
and group Fisher re-derived from them with numpy."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import FAMILIES, FAST_FAMILIES, padded_batch

torch = pytest.importorskip("torch")

import fisherjax  # noqa: E402
from fisherjax.data import IGNORE, Batch  # noqa: E402
from fisherjax.fisher.collect import collect  # noqa: E402
from fisherjax.grads import per_sample_grads  # noqa: E402
from fisherjax.layout import flatten  # noqa: E402
from torch_reference import our_location, reference_groups, torch_per_sample_grads  # noqa: E402


def _batch(seed=0, lengths=(10, 6, 3, 10, 8), seq=10):
    ids, mask = padded_batch(np.random.default_rng(seed), list(lengths), seq, "right")
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    labels[1, :3] = IGNORE  # a prompt whose tokens are not predicted
    return Batch(ids, mask, labels, np.arange(100, 100 + len(lengths)))


def _norm_weighted_error(ours: dict, ref: dict) -> float:
    num = sum(np.sum((ours[k] - ref[k]) ** 2) for k in ref)
    den = sum(np.sum(ref[k] ** 2) for k in ref)
    return float(np.sqrt(num / den))


def _ours_in_hf_space(kind, ours_flat: dict, hf_names) -> dict:
    out = {}
    for name in hf_names:
        path, layer, transposed = our_location(kind, name)
        value = ours_flat[path]  # [n, (layer,) *shape]
        value = value[:, layer] if layer is not None else value
        out[name] = np.swapaxes(value, -1, -2) if transposed else value
    return out


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    """Per family: (model, batch, torch per-sample grads, TaskFisher with everything kept)."""
    cache = {}

    def make(kind):
        if kind not in cache:
            directory, torch_model = hf_checkpoint(kind)
            model = fisherjax.load_pretrained(directory)
            batch = _batch()
            ref = torch_per_sample_grads(torch_model, batch.input_ids, batch.labels)
            fisher = collect(model, [batch], task="t", keep_sample_grads=model.layout.paths(), diagonal=True, progress=False)
            cache[kind] = (model, batch, ref, fisher)
        return cache[kind]

    return make


@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_site_gradients_equal_torch_func(kind, reference):
    model, batch, ref, fisher = reference(kind)
    ours = _ours_in_hf_space(kind, {p: np.asarray(v, np.float64) for p, v in fisher.sample_grads.grads.items()}, ref)
    err = _norm_weighted_error(ours, ref)
    assert err <= 1e-4, f"{kind}: norm-weighted relative error {err:.2e}"
    np.testing.assert_array_equal(fisher.sample_grads.sample_ids, batch.sample_ids)


@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_vmap_gradients_equal_torch_func(kind, reference):
    model, batch, ref, _ = reference(kind)
    grads = flatten(per_sample_grads(model, model.params, batch, chunk_size=2).grads)
    ours = _ours_in_hf_space(kind, {p: np.asarray(v, np.float64) for p, v in grads.items()}, ref)
    err = _norm_weighted_error(ours, ref)
    assert err <= 1e-4, f"{kind}: norm-weighted relative error {err:.2e}"


@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_group_fisher_equals_numpy_reference(kind, reference):
    model, batch, ref, fisher = reference(kind)
    cfg = model.config
    tokens = (batch.labels[:, 1:] != IGNORE).sum(-1).astype(np.float64)
    # Key biases get zero gradient in GPT-2 (softmax ignores a uniform shift), so tolerances are
    # set by the Fisher's scale over the whole model, not per tensor.
    diagonals = {name: (g**2 / tokens.reshape((-1,) + (1,) * (g.ndim - 1))).mean(0) for name, g in ref.items()}
    scale = max(float(c.max()) for c in diagonals.values())
    checked = 0
    for name, c in diagonals.items():
        expected = reference_groups(kind, name, c, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        path, layer, transposed = our_location(kind, name)
        assert set(expected) == set(fisher.group_fisher[path]), (name, path)
        for group_type, values in expected.items():
            ours = fisher.group_fisher[path][group_type]
            ours = ours[layer] if layer is not None else ours
            np.testing.assert_allclose(ours, values, rtol=1e-4, atol=1e-6 * scale, err_msg=f"{name} {group_type}")
            checked += 1
        ours_diag = fisher.diagonal[path][layer] if layer is not None else fisher.diagonal[path]
        np.testing.assert_allclose(ours_diag.T if transposed else ours_diag, c, rtol=1e-4, atol=1e-6 * scale)
    assert checked >= 10


@pytest.mark.parametrize("kind", [pytest.param("gpt2", marks=pytest.mark.slow), "llama"])
def test_ghost_norms_agree_with_materialised(kind, reference):
    model, batch, _, _ = reference(kind)
    ghost = collect(model, [batch], task="t", ghost="always", progress=False)
    plain = collect(model, [batch], task="t", ghost="never", progress=False)
    scale = max(float(v.max()) for groups in plain.group_fisher.values() for v in groups.values())
    for path, groups in plain.group_fisher.items():
        for group_type, values in groups.items():
            np.testing.assert_allclose(ghost.group_fisher[path][group_type], values, rtol=1e-5, atol=1e-7 * scale)


@pytest.mark.parametrize(
    "kind, ghost",
    # Both mappings of the site work are internal paths of one computation whose default (looped on
    # a CPU) is checked against torch.func on every family above; by default one family with GQA
    # runs the non-default setting, the rest only under -m slow.
    [pytest.param(k, g, marks=() if (k, g) == ("llama", "always") else pytest.mark.slow) for k in FAMILIES for g in ("always", "never")],
)
def test_looped_site_work_equals_vmapped(kind, ghost, reference, monkeypatch):
    """The per-sample work from the sites gives the same numbers looped over (sample, layer)
    pieces (the CPU default) as in one vmap, with the vocabulary walked in chunks that do not
    divide it (97 = 7 × 13 + 6, so the last chunk overlaps the one before)."""
    from fisherjax.fisher import sites
    from fisherjax.fisher.step import site_names
    from fisherjax.grads import site_grads

    monkeypatch.setattr(sites, "VOCAB_CHUNK", 13)
    model, batch, _, _ = reference(kind)
    layout = model.layout
    found = sites.discover_sites(layout, site_names(model))
    recorded = site_grads(model, model.params, batch.input_ids, batch.attention_mask, batch.labels)

    def both(fn, **kwargs):
        return [jax.tree.map(np.asarray, fn(layout, found, recorded.inputs, recorded.deltas, loop=loop, **kwargs)) for loop in (True, False)]

    looped, vmapped = both(sites.squared_marginals_from_sites, seq=batch.input_ids.shape[1], ghost=ghost)
    assert set(looped) == set(vmapped) == set(layout.specs)
    for path in vmapped:
        for ours, ref in zip(looped[path], vmapped[path]):
            assert (ours is None) == (ref is None), path
            if ref is not None:
                np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(), err_msg=path)
    looped, vmapped = both(sites.per_sample_grads_from_sites)
    assert set(looped) == set(vmapped) == set(layout.specs)
    assert _norm_weighted_error(looped, vmapped) <= 1e-6


DIAGONAL_VARIANTS = {  # (diagonal_variance, sample_loop): the CPU default, the GPU default, with Welford M2
    "sums-looped": (False, True),
    "sums-vmapped": (False, False),
    "welford": (True, None),
}


@pytest.mark.parametrize(
    "kind,variant",
    [(k, v) if k == FAMILIES[0] or (v, k) == ("sums-looped", "llama") else pytest.param(k, v, marks=pytest.mark.slow)
     for k in FAMILIES for v in DIAGONAL_VARIANTS],  # GPT-2 (fused, tied) every variant, Llama (GQA) the default one; the rest slow
)
def test_diagonal_walked_in_small_pieces_equals_torch(kind, variant, reference, hf_checkpoint, monkeypatch):
    """The full diagonal accumulated a layer, 3 table rows or 3 unembedding columns at a time
    (97 rows: a shorter last piece) still equals the diagonal of torch.func's gradients: as
    running sums of ``g²/T`` formed sample by sample (CPU) or a piece of the batch at a time
    (GPU), and as a Welford state with its M2."""
    from fisherjax.fisher import diagonal

    _, batch, ref, _ = reference(kind)
    monkeypatch.setattr(diagonal, "PIECE_BYTES", 2000)
    monkeypatch.setattr(diagonal, "SAMPLE_PIECE_BYTES", 2000 // batch.input_ids.shape[0])
    variance, loop = DIAGONAL_VARIANTS[variant]
    model = fisherjax.load_pretrained(hf_checkpoint(kind)[0])  # a new model: no cached step
    pieces = collect(model, [batch], task="t", diagonal=True, diagonal_variance=variance, sample_loop=loop, progress=False)
    tokens = (batch.labels[:, 1:] != IGNORE).sum(-1).astype(np.float64)
    diagonals = {name: (g**2 / tokens.reshape((-1,) + (1,) * (g.ndim - 1))).mean(0) for name, g in ref.items()}
    scale = max(float(c.max()) for c in diagonals.values())
    for name, c in diagonals.items():
        path, layer, transposed = our_location(kind, name)
        ours = pieces.diagonal[path][layer] if layer is not None else pieces.diagonal[path]
        np.testing.assert_allclose(ours.T if transposed else ours, c, rtol=1e-4, atol=1e-6 * scale, err_msg=name)
    if not variance:
        assert pieces.diagonal_variance is None
        return
    contributions = {name: g**2 / tokens.reshape((-1,) + (1,) * (g.ndim - 1)) for name, g in ref.items()}
    spread = max(float(c.var(0, ddof=1).max()) for c in contributions.values())
    for name, c in contributions.items():
        path, layer, transposed = our_location(kind, name)
        ours = pieces.diagonal_variance[path][layer] if layer is not None else pieces.diagonal_variance[path]
        np.testing.assert_allclose(ours.T if transposed else ours, c.var(0, ddof=1), rtol=1e-3, atol=1e-6 * spread, err_msg=name)
