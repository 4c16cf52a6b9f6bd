"""ModelLayout: head slices equal the slices Hugging Face's attention code uses for each head."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FAMILIES, padded_batch, tiny_config

torch = pytest.importorskip("torch")

import fisherjax  # noqa: E402
from fisherjax import ConfigError, Model, ModelLayout, Role  # noqa: E402
from fisherjax.layout import flatten, unflatten  # noqa: E402


def hf_head_slices(kind: str, sd: dict, layer: int, cfg) -> dict:
    """Head-major slices of HF weights, by HF's own view/transpose/chunk conventions.

    Returns {(block, kind): [heads, ...]} in Flax orientation: q/k/v kernels [heads, d_in, hd],
    o kernel [heads, hd, d_out], biases [heads, hd].
    """
    H, K, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    w = lambda name: sd[name].detach().numpy()  # noqa: E731
    out = {}
    if kind == "gpt2":  # Conv1D [in, out]; c_attn(x).split(d) -> q|k|v, then view(.., H, hd)
        pre = f"transformer.h.{layer}.attn."
        cw, cb = w(pre + "c_attn.weight"), w(pre + "c_attn.bias")
        for i, b in enumerate("qkv"):
            out[b, "kernel"] = cw[:, i * d : (i + 1) * d].reshape(d, H, hd).transpose(1, 0, 2)
            out[b, "bias"] = cb[i * d : (i + 1) * d].reshape(H, hd)
        out["o", "kernel"] = w(pre + "c_proj.weight").reshape(H, hd, d)
    elif kind == "gpt_neox":  # Linear [out, in]; qkv(x).view(.., H, 3*hd).chunk(3, -1)
        pre = f"gpt_neox.layers.{layer}.attention."
        qw, qb = w(pre + "query_key_value.weight"), w(pre + "query_key_value.bias")
        for i, b in enumerate("qkv"):
            rows = np.concatenate([np.arange(h * 3 * hd + i * hd, h * 3 * hd + (i + 1) * hd) for h in range(H)])
            out[b, "kernel"] = qw[rows].reshape(H, hd, d).transpose(0, 2, 1)
            out[b, "bias"] = qb[rows].reshape(H, hd)
        out["o", "kernel"] = w(pre + "dense.weight").T.reshape(H, hd, d)
    else:  # Llama family: q/k/v_proj(x).view(.., -1, hd): heads on rows; o_proj: heads on columns
        pre = f"model.layers.{layer}.self_attn."
        for b, n in (("q", H), ("k", K), ("v", K)):
            out[b, "kernel"] = w(pre + f"{b}_proj.weight").reshape(n, hd, d).transpose(0, 2, 1)
            if pre + f"{b}_proj.bias" in sd:
                out[b, "bias"] = w(pre + f"{b}_proj.bias").reshape(n, hd)
        out["o", "kernel"] = w(pre + "o_proj.weight").T.reshape(H, hd, d)
    return out


def _head_first(block, kind, view):
    """Layout view of one layer → heads first, matching hf_head_slices."""
    if kind == "bias":
        return view
    return view if block == "o" else np.moveaxis(view, -2, 0)


@pytest.mark.parametrize("kind", FAMILIES)
def test_head_slices_equal_hugging_face(kind, hf_checkpoint):
    directory, torch_model = hf_checkpoint(kind)
    model = fisherjax.load_pretrained(directory)
    views = model.layout.attention(model.params)
    sd = torch_model.state_dict()
    for layer in range(model.config.num_layers):
        expected = hf_head_slices(kind, sd, layer, model.config)
        assert set(expected) == set(views), (set(expected), set(views))
        for (block, k), ref in expected.items():
            ours = _head_first(block, k, np.asarray(views[block, k][layer]))
            np.testing.assert_array_equal(ours, ref, err_msg=f"{kind} layer {layer} {block} {k}")


@pytest.mark.parametrize("kind", FAMILIES)
def test_ablating_a_head_through_the_layout_matches_hf(kind, hf_checkpoint):
    """Zero query head 1's Q slice and kv head 0's V slice in both models; logits still agree."""
    directory, torch_model = hf_checkpoint(kind)
    model = fisherjax.load_pretrained(directory)
    layout = model.layout
    flat = flatten(model.params)
    for block, head in (("q", 1), ("v", 0)):
        (path,) = layout.block_sources(block, "kernel")
        spec = layout.spec(path)
        parts = {b: np.array(layout.view(path, np.asarray(flat[path]), b)) for b in ("qkv" if spec.role == Role.QKV else block)}
        parts[block][1, :, head, :] = 0.0  # layer 1, all inputs, one head
        flat[path] = layout.unview(path, parts)
    params = unflatten(flat)

    hd, d = model.config.head_dim, model.config.hidden_size
    with torch.no_grad():
        sd = {k: v.clone() for k, v in torch_model.state_dict().items()}
        if kind == "gpt2":
            sd["transformer.h.1.attn.c_attn.weight"][:, 1 * hd : 2 * hd] = 0
            sd["transformer.h.1.attn.c_attn.weight"][:, 2 * d : 2 * d + hd] = 0
        elif kind == "gpt_neox":
            sd["gpt_neox.layers.1.attention.query_key_value.weight"][3 * hd : 4 * hd] = 0  # head 1, q
            sd["gpt_neox.layers.1.attention.query_key_value.weight"][2 * hd : 3 * hd] = 0  # head 0, v
        else:
            sd["model.layers.1.self_attn.q_proj.weight"][hd : 2 * hd] = 0
            sd["model.layers.1.self_attn.v_proj.weight"][:hd] = 0
        torch_model_ablated = type(torch_model)(torch_model.config).eval()
        torch_model_ablated.load_state_dict(sd)
        ids, mask = padded_batch(np.random.default_rng(0), [9, 9], 9, "right")
        ref = torch_model_ablated(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model.apply(params, ids, mask))
    base = np.asarray(model.apply(model.params, ids, mask))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert np.abs(base - ours).max() > 1e-3  # the ablation changed something


def test_gqa_map_and_views_of_a_tiny_model():
    model = Model.init(tiny_config("llama", num_heads=6, num_kv_heads=2), seed=0)
    layout = model.layout
    np.testing.assert_array_equal(layout.kv_head_of, [0, 0, 0, 1, 1, 1])
    views = layout.attention(model.params)
    assert views["q", "kernel"].shape == (2, 32, 6, 8)
    assert views["k", "kernel"].shape == (2, 32, 2, 8)
    assert views["o", "kernel"].shape == (2, 6, 8, 32)
    per_head = layout.per_head("q", "kernel", views["q", "kernel"] ** 2)
    assert per_head.shape == (2, 6)
    np.testing.assert_allclose(per_head.sum(-1), (model.params["layers"]["self_attn"]["q_proj"]["kernel"] ** 2).sum((-2, -1)), rtol=1e-5)


def test_layout_by_hand_for_an_unstacked_model():
    """A user's own model with per-layer parameter names and a fused [Q|K|V] projection."""
    rng = np.random.default_rng(0)
    d, H, hd = 8, 2, 4
    params = {
        f"block_{i}": {
            "qkv": {"kernel": rng.normal(size=(d, 3 * H * hd)), "bias": rng.normal(size=(3 * H * hd,))},
            "out": {"kernel": rng.normal(size=(H * hd, d))},
            "norm": {"scale": np.ones(d)},
        }
        for i in range(3)
    }
    params["wte"] = {"embedding": rng.normal(size=(11, d))}
    layout = ModelLayout.from_rules(
        params,
        [
            (r"block_(?P<layer>\d+)/qkv/(kernel|bias)", "qkv", {"fused": "gpt2"}),
            (r"block_(?P<layer>\d+)/out/kernel", "o"),
            (r"block_(?P<layer>\d+)/norm/scale", "norm"),
            (r"wte/embedding", "embed"),
        ],
        num_heads=H,
        head_dim=hd,
    )
    assert layout.num_layers == 3
    views = layout.attention(params)
    assert views["k", "kernel"].shape == (3, d, H, hd)
    np.testing.assert_array_equal(views["k", "kernel"][2, :, 1], params["block_2"]["qkv"]["kernel"][:, H * hd + hd : H * hd + 2 * hd])
    np.testing.assert_array_equal(views["o", "kernel"][0, 1], params["block_0"]["out"]["kernel"][hd:])
    with pytest.raises(ConfigError, match="no layout rule matches"):
        ModelLayout.from_rules({"mystery": {"kernel": np.zeros((2, 2))}}, [(r"wte/embedding", "embed")], num_heads=1, head_dim=2)


def test_view_unview_round_trip_for_every_attention_leaf(hf_checkpoint):
    for kind in ("gpt2", "gpt_neox", "qwen2"):
        model = fisherjax.load_pretrained(hf_checkpoint(kind)[0])
        flat = flatten(model.params)
        layout = model.layout
        for path in layout.paths():
            spec = layout.spec(path)
            if spec.role == Role.QKV:
                blocks = {b: layout.view(path, flat[path], b) for b in "qkv"}
            elif spec.role in (Role.Q, Role.K, Role.V) or (spec.role == Role.O and spec.kind == "kernel"):
                blocks = {spec.role.value: layout.view(path, flat[path])}
            else:
                continue
            np.testing.assert_array_equal(layout.unview(path, blocks), flat[path], err_msg=path)


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama"])
def test_a_group_of_heads_taken_from_a_leaf_is_those_heads_views(kind):
    """``np.take(leaf, head_positions(path, k, n), axis)``, viewed with ``head_group(n)``, is the
    whole layout's view of kv heads ``k … k+n−1`` and their query heads: fused [Q|K|V] (GPT-2),
    interleaved (NeoX) and grouped-query (Llama, two query heads per kv head) layouts alike."""
    model = Model.init(tiny_config(kind), seed=0)  # four query heads; Llama's two kv heads
    layout, flat = model.layout, {p: np.asarray(v) for p, v in flatten(model.params).items()}
    g = layout.kv_groups
    assert layout.head_group(layout.num_kv_heads) is layout
    with pytest.raises(ValueError, match="divisor"):
        layout.head_group(3)
    checked = 0
    for n in (1, layout.num_kv_heads // 2):
        group = layout.head_group(n)
        assert (group.num_heads, group.num_kv_heads) == (n * g, n)
        for start in range(0, layout.num_kv_heads, n):
            for path in layout.paths():
                axis = layout.leaf_head_axis(path)
                if axis is None:
                    continue
                taken = np.take(flat[path], layout.head_positions(path, start, n), axis=axis)
                assert taken.shape == group.spec(path).shape
                spec = layout.spec(path)
                blocks = "qkv" if spec.role == Role.QKV else spec.role.value
                for block in blocks:
                    heads = slice(start, start + n) if block in "kv" else slice(start * g, (start + n) * g)
                    whole = np.moveaxis(np.asarray(layout.view(path, flat[path], block)), layout.head_axis(block, spec.kind), 0)
                    got = np.moveaxis(group.view(path, taken, block), layout.head_axis(block, spec.kind), 0)
                    np.testing.assert_array_equal(got, whole[heads], err_msg=f"{path} {block} heads {heads}")
                    checked += 1
    assert checked > 0
