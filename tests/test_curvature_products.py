"""Matrix-free Fisher-vector products against dense Fishers built from torch.func on Hugging Face's
PyTorch models (float64), on the whole model and on restrictions whose coordinates are re-derived
here from the HF tensor names with their own index arithmetic."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from conftest import FAST_FAMILIES, compilations, padded_batch

torch = pytest.importorskip("torch")

import fisherjax  # noqa: E402
from fisherjax import ConfigError, DataError  # noqa: E402
from fisherjax.curvature import products  # noqa: E402
from fisherjax.curvature.products import (  # noqa: E402
    fisher_operator,
    fisher_vector_product,
    restrict_block,
    restrict_head,
    restrict_layer,
    restrict_union,
)
from fisherjax.data import IGNORE, Batch  # noqa: E402
from fisherjax.fisher.step import sample_labels_per_row  # noqa: E402
from fisherjax.layout import flatten  # noqa: E402
from torch_reference import our_location, torch_per_sample_grads  # noqa: E402

TOLERANCE = 1e-5


def _batches(seed: int = 0, seq: int = 9) -> list[Batch]:
    """Two batches of the same shape: right padding, a masked prompt, a filler row (5 samples)."""
    rng = np.random.default_rng(seed)
    out = []
    for lengths, ids_ in (((9, 5, 3), (10, 11, 12)), ((9, 6, 0), (13, 14, -1))):
        ids, mask = padded_batch(rng, list(lengths), seq, "right")
        labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
        out.append(Batch(ids, mask, labels, np.array(ids_)))
    out[0].labels[1, :3] = IGNORE  # a prompt whose tokens are not predicted
    return out


class Reference:
    """A family's model, batches and the dense pieces of its Fisher in HF space (float64)."""

    def __init__(self, kind: str, directory, torch_model, batches: list[Batch]):
        self.kind, self.torch_model, self.batches = kind, torch_model, batches
        self.model = fisherjax.load_pretrained(directory)
        cfg = self.model.config
        self.heads, self.kv_heads, self.head_dim, self.hidden = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.ids = np.concatenate([b.input_ids for b in batches])
        self.labels = np.concatenate([b.labels for b in batches])
        grads = torch_per_sample_grads(torch_model, self.ids, self.labels)
        self.names = sorted(grads)
        self.shapes = {name: grads[name].shape[1:] for name in self.names}
        self.G = np.concatenate([grads[name].reshape(len(self.ids), -1) for name in self.names], axis=1)  # [rows, D]
        tokens = (self.labels[:, 1:] != IGNORE).sum(1)
        self.n = int((tokens > 0).sum())
        self.weights = np.where(tokens > 0, 1.0 / np.maximum(tokens, 1), 0.0) / self.n  # 1 / (n T_i)

    def to_hf(self, tree) -> np.ndarray:
        """A params-shaped tree as one float64 vector in HF tensor order (``self.names``)."""
        flat = flatten(tree)
        out = []
        for name in self.names:
            path, layer, transposed = our_location(self.kind, name)
            x = np.asarray(flat[path], np.float64)
            x = x[layer] if layer is not None else x
            out.append((x.T if transposed else x).reshape(-1))
        return np.concatenate(out)

    def empirical(self, x: np.ndarray, G: np.ndarray | None = None) -> np.ndarray:
        """``F x = Σ_i g_i (g_i · x) / (n T_i)`` (``G``: per-sample gradients, default the data's)."""
        G = self.G if G is None else G
        return G.T @ (self.weights * (G @ x))

    # ---- restrictions from HF names: layer, block, head ---------------------------------------
    def mask(self, select) -> np.ndarray:
        """Boolean ``[D]`` from ``select(name, shape) -> bool array of the HF tensor's shape``."""
        return np.concatenate([np.asarray(select(n, self.shapes[n]), bool).reshape(-1) for n in self.names])

    def layer_of(self, name: str) -> int | None:
        m = re.search(r"\.(?:h|layers)\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    def head_mask(self, block: str, layer: int | None, heads) -> np.ndarray:
        """The HF entries of attention ``block`` in ``layer`` (all: None) for the given heads."""
        hd, d = self.head_dim, self.hidden

        def rows(offsets):  # positions of the heads along a head axis, given each head's start
            return np.concatenate([np.arange(o, o + hd) for o in offsets])

        def select(name, shape):
            out = np.zeros(shape, bool)
            if layer is not None and self.layer_of(name) != layer:
                return out
            if self.kind == "gpt2":  # Conv1D [in, out]; c_attn columns q | k | v, c_proj rows are heads
                if block != "o" and re.search(r"attn\.c_attn\.(weight|bias)$", name):
                    cols = rows([("qkv".index(block)) * d + h * hd for h in heads])
                    out[..., cols] = True
                elif block == "o" and name.endswith("attn.c_proj.weight"):
                    out[rows([h * hd for h in heads]), :] = True
            elif self.kind == "gpt_neox":  # Linear [out, in]; qkv rows interleave [head, (q, k, v), hd]
                if block != "o" and re.search(r"attention\.query_key_value\.(weight|bias)$", name):
                    out[rows([h * 3 * hd + "qkv".index(block) * hd for h in heads])] = True
                elif block == "o" and name.endswith("attention.dense.weight"):
                    out[:, rows([h * hd for h in heads])] = True
            else:  # Llama family: Linear [out, in]; o_proj columns are heads
                if block != "o" and re.search(rf"self_attn\.{block}_proj\.(weight|bias)$", name):
                    out[rows([h * hd for h in heads])] = True
                elif block == "o" and name.endswith("self_attn.o_proj.weight"):
                    out[:, rows([h * hd for h in heads])] = True
            return out

        return self.mask(select)

    def block_mask(self, block: str, layer: int | None = None) -> np.ndarray:
        return self.head_mask(block, layer, range(self.kv_heads if block in "kv" else self.heads))

    def layer_mask(self, layer: int) -> np.ndarray:
        return self.mask(lambda name, shape: np.full(shape, self.layer_of(name) == layer))


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    cache = {}

    def make(kind):
        if kind not in cache:
            directory, torch_model = hf_checkpoint(kind)
            cache[kind] = Reference(kind, directory, torch_model, _batches())
        return cache[kind]

    return make


def _error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Norm-weighted relative error ``‖ours − ref‖ / ‖ref‖``."""
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _check_restricted(ref: Reference, restriction, mask: np.ndarray, seed: int = 1, **kwargs) -> float:
    """``F_R v`` against ``m ⊙ F (m ⊙ x)`` in HF space; the restriction's coordinates are ``m``."""
    op = fisher_operator(ref.model, ref.model.params, ref.batches, restrict=restriction, **kwargs)
    assert op.size == restriction.size == int(mask.sum())
    v = np.random.default_rng(seed).normal(size=op.size).astype(np.float32)
    x = ref.to_hf(restriction.embed(v))
    np.testing.assert_array_equal(x != 0, mask)  # embed puts v exactly on the HF entries of the slice
    np.testing.assert_array_equal(restriction.project(restriction.embed(v)), v)
    y = np.asarray(op.matvec(v), np.float64)
    assert y.shape == (op.size,)
    return _error(ref.to_hf(restriction.embed(y)), mask * ref.empirical(x))


@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_whole_model_product_equals_torch(kind, reference):
    ref = reference(kind)
    op = fisher_operator(ref.model, ref.model.params, ref.batches)
    assert op.n_samples == ref.n == 5  # the filler row and nothing else is left out
    v = np.random.default_rng(0).normal(size=op.size).astype(np.float32)
    x = ref.to_hf(op.unravel(v))
    err = _error(ref.to_hf(op.unravel(op.matvec(v))), ref.empirical(x))
    assert err <= TOLERANCE, f"{kind}: relative error {err:.2e}"
    # the tree-in, tree-out wrapper: same numbers (and the same compiled step)
    tree = fisher_vector_product(ref.model, ref.model.params, ref.batches, op.unravel(v))
    assert _error(ref.to_hf(tree), ref.empirical(x)) <= TOLERANCE


@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_restricted_product_equals_torch(kind, reference):
    """A whole leaf (the final norm's scale), one layer, block q of another, and one head of each of
    k, v and o, together (one compiled
    step per family): every coordinate is placed where HF keeps it, and ``F_R v`` is the dense
    Fisher's block, cross terms between the pieces included."""
    ref = reference(kind)
    layout = ref.model.layout
    kv_head, o_head = ref.kv_heads - 1, ref.heads - 1
    restriction = restrict_union(
        products.restrict_paths(layout, ["final_norm/scale"]),
        restrict_layer(layout, None, 1),
        restrict_block(layout, "q", 0),
        restrict_head(layout, "k", 0, kv_head),
        restrict_head(layout, "v", 0, 0),
        restrict_head(layout, "o", 0, o_head),
    )
    final_norm = ref.mask(lambda name, shape: np.full(shape, our_location(kind, name)[0] == "final_norm/scale"))
    mask = (final_norm | ref.layer_mask(1) | ref.block_mask("q", 0) | ref.head_mask("k", 0, [kv_head])
            | ref.head_mask("v", 0, [0]) | ref.head_mask("o", 0, [o_head]))
    err = _check_restricted(ref, restriction, mask)
    assert err <= TOLERANCE, f"{kind}: relative error {err:.2e}"


@pytest.mark.parametrize("kind, block, head", [("gpt2", "q", None), ("llama", "q", 3)])
def test_block_and_head_restrictions_on_their_own(kind, block, head, reference):
    """Block q over every layer of GPT-2's fused c_attn, and query head 3 of Llama (GQA: it reads
    kv head 1); another head of the same block reuses the compiled step."""
    ref = reference(kind)
    layout = ref.model.layout
    if head is None:
        err = _check_restricted(ref, restrict_block(layout, block), ref.block_mask(block))
    else:
        err = _check_restricted(ref, restrict_head(layout, block, 1, head), ref.head_mask(block, 1, [head]))
        with compilations() as compiled:
            other = _check_restricted(ref, restrict_head(layout, block, 0, 0), ref.head_mask(block, 0, [0]), seed=2)
        assert compiled.count == 0
        assert other <= TOLERANCE
    assert err <= TOLERANCE, f"{kind}: relative error {err:.2e}"


def _torch_ggn_product(ref: Reference, x: np.ndarray) -> np.ndarray:
    """``(1/n) Σ_i (1/T_i) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t x`` in HF order, float64: ``J x`` by
    ``torch.func.jvp`` of the HF model's logits, the softmax Hessian in numpy, ``Jᵀ (·)`` by
    ``torch.func.vjp``."""
    from torch.func import functional_call, jvp, vjp

    model = ref.torch_model
    params = {k: v.detach() for k, v in model.named_parameters()}
    pieces = np.split(x, np.cumsum([int(np.prod(ref.shapes[name])) for name in ref.names])[:-1])
    by_name = dict(zip(ref.names, pieces))
    tangent = {name: torch.tensor(by_name[name].reshape(ref.shapes[name]), dtype=value.dtype) for name, value in params.items()}
    ids = torch.tensor(ref.ids, dtype=torch.long)

    def logits_of(p):
        return functional_call(model, p, (ids,)).logits

    pad, model.config.pad_token_id = model.config.pad_token_id, None
    try:
        logits, jx = jvp(logits_of, (params,), (tangent,))
        p = torch.softmax(logits.double(), -1).numpy()
        jx = jx.double().numpy()
        predicted = np.concatenate([ref.labels[:, 1:] != IGNORE, np.zeros((len(ref.ids), 1), bool)], axis=1)  # t predicts t+1
        hjx = (p * jx - p * (p * jx).sum(-1, keepdims=True)) * (ref.weights[:, None] * predicted)[..., None]
        (pulled,) = vjp(logits_of, params)[1](torch.tensor(hjx, dtype=logits.dtype))
    finally:
        model.config.pad_token_id = pad
    return np.concatenate([pulled[name].double().numpy().reshape(-1) for name in ref.names])


def test_ggn_equals_the_torch_ggn(reference):
    """``kind="ggn"``: ``(1/n) Σ_i (1/T_i) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t`` against torch.func's
    JVP and VJP of the HF model."""
    ref = reference("llama")
    op = fisher_operator(ref.model, ref.model.params, ref.batches, kind="ggn")
    v = np.random.default_rng(3).normal(size=op.size).astype(np.float32)
    x = ref.to_hf(op.unravel(v))
    err = _error(ref.to_hf(op.unravel(op.matvec(v))), _torch_ggn_product(ref, x))
    assert err <= TOLERANCE, f"ggn: relative error {err:.2e}"


def test_true_fisher_is_the_empirical_fisher_of_the_drawn_labels(reference):
    """``kind="true"`` with a fixed key: draw ``s`` of sample ``i`` from ``split(fold_in(key, id_i),
    draws)[s]`` (Phase 1's rule); the product is the mean over draws of the dense empirical
    Fisher (torch.func) with the drawn labels."""
    ref = reference("llama")
    key, draws = jax.random.key(7), 2
    op = fisher_operator(ref.model, ref.model.params, ref.batches, kind="true", key=key, true_samples=draws)
    v = np.random.default_rng(4).normal(size=op.size).astype(np.float32)
    x = ref.to_hf(op.unravel(v))
    model = ref.model

    @jax.jit
    def draw(sample_ids, ids, mask, labels):  # [draws, batch, seq]
        keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), draws))(sample_ids)
        logits = model.apply(model.params, ids, mask)
        return jax.vmap(lambda k: sample_labels_per_row(k, logits, labels), in_axes=1)(keys)

    drawn_all = np.concatenate([np.asarray(draw(np.asarray(b.sample_ids, np.int32), b.input_ids, b.attention_mask, b.labels))
                                for b in ref.batches], axis=1)
    expected = np.zeros_like(x)
    for drawn in drawn_all:
        assert ((drawn != IGNORE) == (ref.labels != IGNORE))[:, 1:].all() and (drawn != ref.labels)[:, 1:].any()
        grads = torch_per_sample_grads(ref.torch_model, ref.ids, drawn)
        G = np.concatenate([grads[name].reshape(len(ref.ids), -1) for name in ref.names], axis=1)
        expected += ref.empirical(x, G) / draws
    err = _error(ref.to_hf(op.unravel(op.matvec(v))), expected)
    assert err <= TOLERANCE, f"true: relative error {err:.2e}"


def test_user_errors(reference):
    ref = reference("llama")
    layout, model = ref.model.layout, ref.model
    with pytest.raises(ConfigError, match="kind"):
        fisher_operator(model, model.params, ref.batches, kind="hessian")
    with pytest.raises(ConfigError, match="true_samples"):
        fisher_operator(model, model.params, ref.batches, kind="true", true_samples=0)
    empty = ref.batches[0]._replace(labels=np.full_like(ref.batches[0].labels, IGNORE))
    with pytest.raises(DataError, match="no sample"):
        fisher_operator(model, model.params, [empty])
    with pytest.raises(ConfigError, match="head 2 is out of range"):
        restrict_head(layout, "k", 0, 2)  # two kv heads
    with pytest.raises(ConfigError, match="layer 2 is out of range"):
        restrict_layer(layout, None, 2)
    with pytest.raises(ConfigError, match="block"):
        restrict_block(layout, "x")
    with pytest.raises(ConfigError, match="not a parameter"):
        products.restrict_paths(layout, ["layers/nothing/kernel"])
    with pytest.raises(ConfigError, match="overlap"):
        restrict_union(restrict_block(layout, "q"), restrict_head(layout, "q", 1, 0))
    op = fisher_operator(model, model.params, ref.batches, restrict=restrict_head(layout, "o", 0, 0))
    with pytest.raises(ConfigError, match="length"):
        op.matvec(np.zeros(op.size + 1, np.float32))


def test_restrictions_of_an_unstacked_model_with_a_fused_projection():
    """Per-layer leaves (``block_<layer>/...``) and a fused [Q | K | V] projection: each restriction
    puts a vector exactly on the entries the model's own names say (numpy, nothing compiled)."""
    from fisherjax import ModelLayout

    d, H, hd = 8, 2, 4
    params = {f"block_{i}": {"qkv": {"kernel": np.zeros((d, 3 * H * hd)), "bias": np.zeros(3 * H * hd)},
                             "out": {"kernel": np.zeros((H * hd, d))}, "norm": {"scale": np.zeros(d)}} for i in range(3)}
    params["wte"] = {"embedding": np.zeros((11, d))}
    layout = ModelLayout.from_rules(params, [
        (r"block_(?P<layer>\d+)/qkv/(kernel|bias)", "qkv", {"fused": "gpt2"}),
        (r"block_(?P<layer>\d+)/out/kernel", "o"),
        (r"block_(?P<layer>\d+)/norm/scale", "norm"),
        (r"wte/embedding", "embed"),
    ], num_heads=H, head_dim=hd)

    def support(restriction) -> dict:
        tree = restriction.embed(np.arange(1, restriction.size + 1, dtype=np.float32))
        np.testing.assert_array_equal(restriction.project(tree), np.arange(1, restriction.size + 1))
        return {path: leaf != 0 for path, leaf in flatten(tree).items() if (leaf != 0).any()}

    k_cols = slice(H * hd + hd, H * hd + 2 * hd)  # k block, head 1
    found = support(restrict_head(layout, "k", 2, 1))
    assert set(found) == {"block_2/qkv/kernel", "block_2/qkv/bias"}
    expected = np.zeros((d, 3 * H * hd), bool)
    expected[:, k_cols] = True
    np.testing.assert_array_equal(found["block_2/qkv/kernel"], expected)
    np.testing.assert_array_equal(found["block_2/qkv/bias"], expected[0])

    found = support(restrict_head(layout, "o", 0, 1))
    expected = np.zeros((H * hd, d), bool)
    expected[hd:] = True
    assert set(found) == {"block_0/out/kernel"}
    np.testing.assert_array_equal(found["block_0/out/kernel"], expected)

    found = support(restrict_block(layout, "v"))  # every layer's v columns
    assert set(found) == {f"block_{i}/qkv/{kind}" for i in range(3) for kind in ("kernel", "bias")}
    assert all(mask[..., 2 * H * hd:].all() and not mask[..., : 2 * H * hd].any() for mask in found.values())

    found = support(restrict_layer(layout, None, 1))
    assert set(found) == {"block_1/qkv/kernel", "block_1/qkv/bias", "block_1/out/kernel", "block_1/norm/scale"}
    assert all(mask.all() for mask in found.values())
    with pytest.raises(ConfigError, match="not in layer 1"):
        restrict_layer(layout, ["block_0/norm/scale"], 1)
