"""Behavioural head scores and categories (fisherjax.heads) against independent references:
constructed attention patterns with known answers, TransformerLens' published ``detect_head``
definitions and a plain loop of the "targets" normalisation written here in numpy, Hugging
Face's eager ``output_attentions`` with left and right padding, and a float64 numpy copying score
that slices the raw parameters with its own index arithmetic (GPT-2's [Q|K|V] columns, NeoX's
per-head interleave, GQA's kv head h // (H/H_kv))."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import FAST_FAMILIES, padded_batch, tiny_config

import fisherjax
from fisherjax import heads
from fisherjax.data import IGNORE, Batch
from fisherjax.errors import ConfigError
from fisherjax.heads import HeadScores, Thresholds
from fisherjax.layout import flatten, unflatten
from fisherjax.models import Model
from fisherjax.models.common import positions_from_mask

BOS = 1


# ---- constructed attention tensors ------------------------------------------------------------


def repeated(rng, n: int, half: int, vocab: int = 90) -> np.ndarray:
    """``[n, 1 + 2·half]`` ids ``BOS t t`` with distinct tokens (≥ 3) in each copy."""
    body = np.stack([rng.choice(np.arange(3, vocab), size=half, replace=False) for _ in range(n)])
    return np.concatenate([np.full((n, 1), BOS), body, body], axis=1).astype(np.int32)


def one_hot_rows(targets: np.ndarray, seq: int) -> np.ndarray:
    """``[seq, seq]`` attention with each row ``q`` all on key ``targets[q]``."""
    a = np.zeros((seq, seq))
    a[np.arange(seq), targets] = 1.0
    return a


def pure_heads(ids: np.ndarray, half: int) -> np.ndarray:
    """``[1, batch, 6, seq, seq]``: previous-token, induction, duplicate, self, first position,
    uniform heads on the repeated sequences ``ids`` (rows without a target look at BOS)."""
    n, seq = ids.shape
    q = np.arange(seq)
    second = q >= 1 + half
    prev = one_hot_rows(np.maximum(q - 1, 0), seq)
    induction = one_hot_rows(np.where(second, q - half + 1, 0), seq)
    duplicate = one_hot_rows(np.where(second, q - half, 0), seq)
    own = np.eye(seq)
    first = one_hot_rows(np.zeros(seq, int), seq)
    uniform = np.tril(np.ones((seq, seq))) / (q[:, None] + 1)
    per_head = np.stack([prev, induction, duplicate, own, first, uniform])
    return np.broadcast_to(per_head, (1, n, *per_head.shape)).copy()


def max_token_head(ids: np.ndarray) -> np.ndarray:
    """``[batch, seq, seq]``: each row all on the earlier key holding the largest token id — a
    pattern set by content."""
    n, seq = ids.shape
    out = np.zeros((n, seq, seq))
    for b in range(n):
        for q in range(seq):
            out[b, q, np.argmax(ids[b, : q + 1])] = 1.0
    return out


def random_causal(rng, layers: int, n: int, heads_: int, lengths) -> list[np.ndarray]:
    """Per sample, random causal softmax attention ``[layer, heads, n_b, n_b]`` (float64)."""
    out = []
    for length in lengths:
        logits = rng.normal(size=(layers, heads_, length, length)) * 2.0
        logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        out.append(a / a.sum(-1, keepdims=True))
    return out


def pad(per_sample, ids_list, seq: int, side: str):
    """Embed unpadded samples into ``[layer, batch, heads, seq, seq]`` with padding on ``side``;
    padded query rows attend to themselves (as the models do)."""
    layers, heads_ = per_sample[0].shape[:2]
    a = np.zeros((layers, len(per_sample), heads_, seq, seq))
    ids = np.zeros((len(per_sample), seq), np.int32)
    mask = np.zeros((len(per_sample), seq), np.int32)
    for b, (s, tokens) in enumerate(zip(per_sample, ids_list)):
        n = len(tokens)
        sl = slice(seq - n, seq) if side == "left" else slice(0, n)
        a[:, b, :, sl, sl] = s
        ids[b, sl], mask[b, sl] = tokens, 1
        for q in np.flatnonzero(mask[b] == 0):
            a[:, b, :, q, q] = 1.0
    return a, ids, mask


# ---- independent references -------------------------------------------------------------------


def tl_patterns(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """TransformerLens' head_detector patterns for one unpadded sequence, from its documentation:
    previous token = ones on the sub-diagonal; duplicate token = tril(token_i == token_j) with a
    zero diagonal; induction = the duplicate pattern shifted right one column, first column zero,
    tril."""
    n = len(tokens)
    prev = np.tril(np.eye(n, k=-1))
    dup = (tokens[None, :] == tokens[:, None]).astype(float)
    np.fill_diagonal(dup, 0.0)
    dup = np.tril(dup)
    shifted = np.zeros_like(dup)
    shifted[:, 1:] = dup[:, :-1]
    return {"previous_token": prev, "duplicate": dup, "induction": np.tril(shifted)}


def tl_scores(per_sample, ids_list) -> dict[str, np.ndarray]:
    """``detect_head(..., error_measure="mul")`` averaged over sequences: Σ A·P / Σ A per head."""
    out = {}
    for name in ("previous_token", "duplicate", "induction"):
        per = []
        for a, tokens in zip(per_sample, ids_list):
            p = tl_patterns(np.asarray(tokens))[name]
            per.append(np.array([[(a[l, h] * p).sum() / a[l, h].sum() for h in range(a.shape[1])] for l in range(a.shape[0])]))
        out[name] = np.mean(per, axis=0)
    return out


def loop_targets(per_sample, ids_list) -> dict[str, np.ndarray]:
    """The "targets" normalisation by loops: per sample, the mean over rows with a target of the
    row's mass on its targets; then the mean over samples that have such a row."""

    def targets(tokens, q):
        if name == "previous_token":
            return [q - 1] if q >= 1 else []
        if name == "duplicate":
            return [k for k in range(q) if tokens[k] == tokens[q]]
        if name == "current_token":
            return [q]
        if name == "first_position":
            return [0]
        return [k for k in range(1, q + 1) if tokens[k - 1] == tokens[q]]

    out = {}
    for name in ("previous_token", "duplicate", "current_token", "induction", "first_position"):
        per = []
        for a, tokens in zip(per_sample, ids_list):
            rows = [(q, targets(tokens, q)) for q in range(len(tokens))]
            rows = [(q, t) for q, t in rows if t]
            if rows:
                per.append(np.mean([a[:, :, q, t].sum(-1) for q, t in rows], axis=0))
        out[name] = np.mean(per, axis=0) if per else np.full(per_sample[0].shape[:2], np.nan)
    return out


def loop_positional(a: np.ndarray) -> np.ndarray:
    """1 − mean over samples and rows q ≥ 1 of ½‖A_b[q] − mean_b A_b[q]‖₁ (unpadded, one length)."""
    layers, n, heads_, seq, _ = a.shape
    out = np.zeros((layers, heads_))
    for l in range(layers):
        for h in range(heads_):
            mean = a[l, :, h].mean(0)
            out[l, h] = 1 - np.mean([0.5 * np.abs(a[l, b, h, q] - mean[q]).sum() for b in range(n) for q in range(1, seq)])
    return out


# ---- pattern scores ---------------------------------------------------------------------------


def test_pure_patterns_take_their_extreme_values():
    rng = np.random.default_rng(0)
    half = 6
    ids = repeated(rng, 3, half)
    a = pure_heads(ids, half)
    mask = np.ones_like(ids)
    s = heads.pattern_scores(a, ids, mask)
    prev, ind, dup, own, first, uniform = range(6)
    np.testing.assert_allclose(s.previous_token[0, prev], 1.0, atol=1e-6)
    np.testing.assert_allclose(s.induction[0, ind], 1.0, atol=1e-6)
    np.testing.assert_allclose(s.duplicate[0, dup], 1.0, atol=1e-6)
    np.testing.assert_allclose(s.current_token[0, own], 1.0, atol=1e-6)
    np.testing.assert_allclose(s.first_position[0, first], 1.0, atol=1e-6)
    # Each pure head scores 0 on the other targeted patterns (none of its keys is their target).
    np.testing.assert_allclose(s.induction[0, [prev, dup, own]], 0.0, atol=1e-6)
    np.testing.assert_allclose(s.previous_token[0, own], 0.0, atol=1e-6)
    np.testing.assert_allclose(s.duplicate[0, [prev, ind, own]], 0.0, atol=1e-6)
    # Uniform attention over the q + 1 keys: 1/(q+1) on the single target of each row.
    seq = ids.shape[1]
    np.testing.assert_allclose(s.previous_token[0, uniform], np.mean(1 / (np.arange(1, seq) + 1)), rtol=1e-5)
    np.testing.assert_allclose(s.induction[0, uniform], np.mean(1 / (np.arange(1 + half, seq) + 1)), rtol=1e-5)
    assert s.previous_token[0, uniform] < 0.2 and s.induction[0, uniform] < 0.2
    # Under "all" the pure induction head's mass on targets is the share of rows that have one.
    tl = heads.pattern_scores(a, ids, mask, normalize="all")
    np.testing.assert_allclose(tl.induction[0, ind], half / seq, rtol=1e-5)
    np.testing.assert_allclose(tl.previous_token[0, prev], (seq - 1) / seq, rtol=1e-5)


def test_constructed_heads_get_their_labels():
    rng = np.random.default_rng(1)
    half = 6
    ids = repeated(rng, 4, half)
    a = pure_heads(ids, half)
    content = max_token_head(ids)[None, :, None]
    mixed = 0.5 * (a[:, :, 0:1] + a[:, :, 1:2])  # half previous token, half induction
    a = np.concatenate([a, content, mixed], axis=2)
    mask = np.ones_like(ids)
    s = heads.pattern_scores(a, ids, mask)
    positional = np.asarray(heads.positional_scores(a, mask))
    np.testing.assert_allclose(positional[0, :6], 1.0, atol=1e-6)  # every pure pattern is set by position
    assert positional[0, 6] < 0.9
    zeros = np.zeros_like(positional)
    scores = HeadScores(
        previous_token=s.previous_token, duplicate=s.duplicate, current_token=s.current_token, induction=s.induction,
        first_position=s.first_position, positional=positional, copying=zeros, previous_token_tl=zeros,
        duplicate_tl=zeros, induction_tl=zeros,
    )
    labels = heads.label(scores)
    assert labels.tolist() == [
        ["previous_token", "induction", "same_token", "positional", "positional", "positional", "content", "mixed"]
    ]


def test_positional_score_equals_a_loop_and_separates_content_from_position():
    rng = np.random.default_rng(2)
    n, seq = 8, 10
    ids = rng.integers(3, 90, size=(n, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    random_heads = np.stack(random_causal(rng, 2, n, 3, [seq] * n), axis=1)  # [layer, batch, heads, q, k]
    uniform = np.broadcast_to(np.tril(np.ones((seq, seq))) / np.arange(1, seq + 1)[:, None], (n, seq, seq))
    a = np.concatenate([random_heads, np.stack([max_token_head(ids), uniform])[:, :, None]], axis=2)
    got = np.asarray(heads.positional_scores(a, mask))
    np.testing.assert_allclose(got, loop_positional(a), atol=1e-5)
    np.testing.assert_allclose(got[1, 3], 1.0, atol=1e-6)  # uniform: the same rows whatever the content
    assert got[0, 3] < 0.9  # the max-token head follows the content


def test_scores_do_not_depend_on_the_padding_side():
    rng = np.random.default_rng(3)
    lengths = [13, 7, 10, 2]
    ids_list = [rng.integers(3, 12, size=n) for n in lengths]  # a small vocabulary: many duplicates
    per_sample = random_causal(rng, 2, len(lengths), 3, lengths)
    got = {}
    for side in ("left", "right"):
        a, ids, mask = pad(per_sample, ids_list, 15, side)
        got[side] = (
            heads.sample_scores(a, ids, mask, normalize="targets"),
            heads.sample_scores(a, ids, mask, normalize="all"),
            heads.positional_sample_scores(a, mask),
        )
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), got["left"], got["right"])
    # A padded sample scores what it scores alone, unpadded.
    for b in (1, 3):
        s, tokens = per_sample[b], ids_list[b]
        alone = heads.sample_scores(s[:, None], tokens[None], np.ones((1, len(tokens)), np.int32))
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x[b], y[0], atol=1e-6), got["left"][0], alone)


def test_all_normalisation_equals_transformer_lens_and_targets_equals_a_loop():
    rng = np.random.default_rng(4)
    ids_list = [*repeated(rng, 3, 5), rng.integers(3, 9, size=11), rng.choice(np.arange(3, 90), 11, replace=False)]
    ids_list = [np.asarray(t) for t in ids_list]
    per_sample = random_causal(rng, 2, len(ids_list), 3, [11] * len(ids_list))
    a = np.stack(per_sample, axis=1)
    ids = np.stack(ids_list)
    mask = np.ones_like(ids)
    tl = heads.pattern_scores(a, ids, mask, normalize="all")
    ref = tl_scores(per_sample, ids_list)
    for name, value in ref.items():
        np.testing.assert_allclose(getattr(tl, name), value, atol=1e-6, err_msg=name)
    targets = heads.pattern_scores(a, ids, mask, normalize="targets")
    for name, value in loop_targets(per_sample, ids_list).items():
        np.testing.assert_allclose(getattr(targets, name), value, atol=1e-6, err_msg=name)
    with pytest.raises(ConfigError, match="normalize"):
        heads.pattern_scores(a, ids, mask, normalize="rows")


def test_target_patterns_on_a_padded_repeated_sequence():
    ids = np.array([[0, 0, BOS, 5, 6, 5, 6]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1]], np.int32)
    p = heads.target_patterns(ids, mask)
    assert {tuple(x) for x in np.argwhere(np.asarray(p.induction[0]))} == {(5, 4), (6, 5)}
    assert {tuple(x) for x in np.argwhere(np.asarray(p.duplicate[0]))} == {(5, 3), (6, 4)}
    assert {tuple(x) for x in np.argwhere(np.asarray(p.previous_token[0]))} == {(q, q - 1) for q in range(3, 7)}
    assert {tuple(x) for x in np.argwhere(np.asarray(p.first_position[0]))} == {(q, 2) for q in range(2, 7)}


# ---- the model's patterns -------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_model_attention_equals_hugging_face_eager(kind, side, hf_checkpoint):
    torch = pytest.importorskip("torch")
    directory, torch_model = hf_checkpoint(kind)
    model = fisherjax.load_pretrained(directory)
    ids, mask = padded_batch(np.random.default_rng(5), lengths=[12, 7, 3, 10], seq=12, side=side)
    ids[:, :] = np.where(mask == 1, np.where(np.arange(12) % 4 == 0, 5, ids), 0)  # some duplicate tokens
    ours = np.asarray(model.attentions(model.params, ids, mask))
    with torch.no_grad():
        out = torch_model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(np.asarray(positions_from_mask(mask)), dtype=torch.long),
            output_attentions=True,
        )
    ref = np.stack([x.numpy() for x in out.attentions])  # [layer, batch, heads, q, k]
    real = (mask[:, :, None] & mask[:, None, :]).astype(bool)[None, :, None]
    real = np.broadcast_to(real, ours.shape)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-5)
    for normalize in ("targets", "all"):
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
            heads.pattern_scores(ours, ids, mask, normalize=normalize),
            heads.pattern_scores(np.where(real, ref, 0.0), ids, mask, normalize=normalize),
        )


# ---- copying ------------------------------------------------------------------------------------


def perturbed(model: Model, seed: int) -> dict:
    """The model's parameters plus noise on every leaf (so biases and norm scales matter)."""
    rng = np.random.default_rng(seed)
    flat = {k: np.asarray(v) + 0.3 * rng.normal(size=np.shape(v)).astype(np.float32) for k, v in flatten(model.params).items()}
    return unflatten(flat)


def numpy_copying(family: str, params: dict, cfg, tokens: np.ndarray) -> np.ndarray:
    """float64 copying score straight from the raw parameter arrays (loops over layers, heads)."""
    f = {k: np.asarray(v, np.float64) for k, v in flatten(params).items()}
    heads_, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    eps = cfg.norm_eps

    def norm(x, scale, bias):
        if bias is not None:
            x = x - x.mean(-1, keepdims=True)
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale
        return y if bias is None else y + bias

    if family == "gpt2":
        ln, wv_all, bv_all, wo_all = "layers/ln_1", f["layers/attn/c_attn/kernel"], f["layers/attn/c_attn/bias"], f["layers/attn/c_proj/kernel"]
    elif family == "gpt_neox":
        ln, wv_all, bv_all, wo_all = (
            "layers/input_layernorm", f["layers/attention/query_key_value/kernel"],
            f["layers/attention/query_key_value/bias"], f["layers/attention/dense/kernel"],
        )
    else:
        ln, wv_all, wo_all = "layers/input_layernorm", f["layers/self_attn/v_proj/kernel"], f["layers/self_attn/o_proj/kernel"]
        bv_all = f.get("layers/self_attn/v_proj/bias")
    embed = f["embed/embedding"]
    unembed = f["lm_head/kernel"] if "lm_head/kernel" in f else embed.T
    final_scale = f["final_norm/scale"]
    s_count = len(tokens)
    out = np.zeros((cfg.num_layers, heads_))
    for l in range(cfg.num_layers):
        x = norm(embed[tokens], f[f"{ln}/scale"][l], f.get(f"{ln}/bias", [None] * cfg.num_layers)[l])
        for h in range(heads_):
            if family == "gpt2":
                cols = slice(2 * d + h * hd, 2 * d + (h + 1) * hd)
                w_v, b_v = wv_all[l][:, cols], bv_all[l][cols]
            elif family == "gpt_neox":
                cols = slice(h * 3 * hd + 2 * hd, h * 3 * hd + 3 * hd)
                w_v, b_v = wv_all[l][:, cols], bv_all[l][cols]
            else:
                g = h // (heads_ // kv)
                w_v = wv_all[l][:, g * hd : (g + 1) * hd]
                b_v = 0.0 if bv_all is None else bv_all[l][g * hd : (g + 1) * hd]
            o = (x @ w_v + b_v) @ wo_all[l][h * hd : (h + 1) * hd]
            o = o - o.mean(-1, keepdims=True) if "final_norm/bias" in f else o
            logits = o / np.sqrt((o * o).mean(-1, keepdims=True) + eps) * final_scale @ unembed[:, tokens]
            ranks = [(logits[s] > logits[s, s]).sum() for s in range(s_count)]
            out[l, h] = np.mean([1 - r / (s_count - 1) for r in ranks])
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_copying_equals_a_numpy_loop(family):
    changes = {"qkv_bias": True} if family == "llama" else {}
    model = Model.init(tiny_config(family, **changes), seed=0)
    params = perturbed(model, 1)
    tokens = np.sort(np.random.default_rng(2).choice(np.arange(model.config.vocab_size), 40, replace=False))
    got = np.asarray(heads.copying_scores(model, params, tokens=tokens))
    ref = numpy_copying(family, params, model.config, tokens)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert np.ptp(ref) > 0.05  # the heads differ: a score that cannot tell them apart would pass nothing


def test_copying_of_an_identity_ov_circuit_is_one_and_of_its_negation_zero():
    cfg = tiny_config("llama", head_dim=32)
    model = Model.init(cfg, seed=0)
    d, layers = cfg.hidden_size, cfg.num_layers
    rng = np.random.default_rng(3)
    embed = rng.normal(size=(cfg.vocab_size, d))
    embed = (embed / np.linalg.norm(embed, axis=1, keepdims=True)).astype(np.float32)  # rows of one norm
    flat = {k: np.asarray(v) for k, v in flatten(model.params).items()}
    flat["embed/embedding"] = embed
    flat["lm_head/kernel"] = embed.T.copy()
    eye = np.eye(d, dtype=np.float32)
    flat["layers/self_attn/v_proj/kernel"] = np.broadcast_to(np.concatenate([eye] * cfg.num_kv_heads, 1), (layers, d, d * cfg.num_kv_heads)).copy()
    for sign, expected in ((1.0, 1.0), (-1.0, 0.0)):
        flat["layers/self_attn/o_proj/kernel"] = np.broadcast_to(sign * np.concatenate([eye] * cfg.num_heads, 0), (layers, d * cfg.num_heads, d)).copy()
        got = np.asarray(heads.copying_scores(model, unflatten(flat), n_tokens=64))
        np.testing.assert_allclose(got, expected, atol=1e-6)


# ---- probes, categorise, labels -----------------------------------------------------------------


def test_probes_from_the_demo_vocabulary():
    from fisherjax import demo

    model = demo.load()
    special = set(model.tokenizer.all_special_ids)
    ordinary = heads.ordinary_tokens(model)
    assert not special & set(ordinary.tolist()) and len(ordinary) == model.config.vocab_size - len(special)
    probe = heads.induction_probe(model, n=5, length=40, seed=0)  # 2·40 + BOS does not fit in 64 positions
    half = (model.config.max_position_embeddings - 1) // 2
    assert probe.input_ids.shape == (5, 1 + 2 * half)
    assert (probe.input_ids[:, 0] == model.tokenizer.bos_token_id).all()
    first, second = probe.input_ids[:, 1 : 1 + half], probe.input_ids[:, 1 + half :]
    np.testing.assert_array_equal(first, second)
    assert all(len(set(row)) == half for row in first.tolist())
    assert not special & set(first.ravel().tolist())
    assert (probe.labels[:, : 2 + half] == IGNORE).all() and (probe.labels[:, 2 + half :] == second[:, 1:]).all()
    np.testing.assert_array_equal(probe.input_ids, heads.induction_probe(model, n=5, length=40, seed=0).input_ids)
    assert not np.array_equal(probe.input_ids, heads.induction_probe(model, n=5, length=40, seed=1).input_ids)
    plain = heads.random_probe(model, n=4, length=20, seed=0)
    assert plain.input_ids.shape == (4, 21) and plain.attention_mask.all()
    assert not special & set(plain.input_ids[:, 1:].ravel().tolist())


def test_categorise_gqa_model_without_tokenizer():
    cfg = tiny_config("llama")  # 4 query heads reading 2 kv heads
    assert cfg.num_kv_heads < cfg.num_heads
    model = Model.init(cfg, seed=0)
    assert model.tokenizer is None
    np.testing.assert_array_equal(heads.ordinary_tokens(model), np.arange(cfg.vocab_size))
    cats = heads.categorise(model, n_probe=4, length=8, n_tokens=32)
    np.testing.assert_array_equal(cats.kv_head, model.layout.kv_head_of)
    np.testing.assert_array_equal(cats.kv_head, [0, 0, 1, 1])
    assert cats.labels.shape == (cfg.num_layers, cfg.num_heads) and cats.n_probe == 8
    assert set(cats.labels.ravel()) <= set(heads.CATEGORIES)
    for value in cats.scores:
        assert value.shape == (cfg.num_layers, cfg.num_heads) and np.isfinite(value).all()
    # The scores are those of the probes' own attention, measured here through the public pieces.
    probe = heads.induction_probe(model, n=4, length=8, seed=0)
    a = model.attentions(model.params, probe.input_ids, probe.attention_mask)
    direct = heads.pattern_scores(a, probe.input_ids, probe.attention_mask)
    np.testing.assert_allclose(cats.scores.induction, direct.induction, atol=1e-6)
    np.testing.assert_allclose(cats.scores.duplicate, direct.duplicate, atol=1e-6)
    # User batches replace the random probe; JSON round trip is strict JSON.
    ids, mask = padded_batch(np.random.default_rng(6), lengths=[9, 5, 9], seq=9, side="left")
    user = Batch(ids, mask, ids, np.arange(3))
    mine = heads.categorise(model, batches=[user], n_probe=4, length=8, n_tokens=32)
    a = model.attentions(model.params, ids, mask)
    np.testing.assert_allclose(mine.scores.previous_token, heads.pattern_scores(a, ids, mask).previous_token, atol=1e-6)
    np.testing.assert_allclose(mine.scores.positional, heads.positional_scores(a, mask), atol=1e-6)
    back = heads.from_json(json.loads(json.dumps(heads.to_json(mine), allow_nan=False)))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-12), tuple(back.scores), tuple(mine.scores))
    assert back.labels.tolist() == mine.labels.tolist() and back.thresholds == mine.thresholds
    np.testing.assert_array_equal(back.kv_head, mine.kv_head)


def _scores(**values) -> HeadScores:
    base = {f: np.zeros((1, 1)) for f in HeadScores._fields}
    base.update({k: np.array([[v]], float) for k, v in values.items()})
    return HeadScores(**base)


@pytest.mark.parametrize(
    "values, expected",
    [
        (dict(induction=0.5), "induction"),
        (dict(previous_token=0.4), "previous_token"),
        (dict(duplicate=0.9, positional=1.0), "same_token"),
        (dict(induction=0.5, duplicate=0.5), "mixed"),
        (dict(induction=0.5, previous_token=0.6, duplicate=0.5), "mixed"),
        (dict(previous_token=0.39, positional=0.9), "positional"),
        (dict(previous_token=0.39, positional=0.89), "content"),
        (dict(induction=np.nan, positional=np.nan), "content"),
    ],
)
def test_label_rules(values, expected):
    assert heads.label(_scores(**values))[0, 0] == expected


def test_copying_as_an_induction_condition_and_category_helpers():
    scores = _scores(induction=0.8, copying=0.3, positional=0.95)
    assert heads.label(scores)[0, 0] == "induction"
    assert heads.label(scores, Thresholds(copying=0.5))[0, 0] == "positional"
    cats = heads.HeadCategories(scores, heads.label(scores), Thresholds(), np.array([0]), 4)
    assert heads.category_of(cats, 0, 0) == "induction"
    np.testing.assert_array_equal(heads.heads_in(cats, "induction"), [[True]])
    np.testing.assert_array_equal(heads.heads_in(cats, "content"), [[False]])
    assert heads.category_of(heads.relabel(cats, Thresholds(induction=0.9)), 0, 0) == "positional"
    with pytest.raises(ConfigError, match="unknown head category"):
        heads.heads_in(cats, "name_mover")
