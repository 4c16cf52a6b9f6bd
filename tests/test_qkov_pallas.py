"""The Pallas slice-product kernel beyond what the brute-force tests of test_qkov.py cover (there it
runs in interpret mode on every family): that it lowers to Triton for a GPU — checked on this
machine by lowering for CUDA without one — on each fused layout and GQA, and its tile rules."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fisherjax
from fisherjax.analysis import qkov
from fisherjax.analysis.qkov import _looped, _pallas
from fisherjax.errors import ConfigError
from fisherjax.fisher.state import SampleGrads
from fisherjax.layout import FAMILY_RULES, ModelLayout

FAMILY_SHAPES = {  # family: (paths and per-layer shapes of the attention kernels, heads, kv heads)
    "gpt2": ({"layers/attn/c_attn/kernel": (64, 192), "layers/attn/c_proj/kernel": (64, 64)}, 4, 4),
    "gpt_neox": ({"layers/attention/query_key_value/kernel": (64, 192), "layers/attention/dense/kernel": (64, 64)}, 4, 4),
    "llama": (
        {
            "layers/self_attn/q_proj/kernel": (64, 64),
            "layers/self_attn/k_proj/kernel": (64, 32),
            "layers/self_attn/v_proj/kernel": (64, 32),
            "layers/self_attn/o_proj/kernel": (64, 64),
        },
        4,
        2,
    ),
}


def _layout(family: str, layers: int = 2) -> ModelLayout:
    """Shape-only attention kernels of a family with head_dim 16 (Triton's smallest tile)."""
    shapes, heads, kv_heads = FAMILY_SHAPES[family]
    params = {p: np.broadcast_to(np.float32(0), (layers, *s)) for p, s in shapes.items()}
    return ModelLayout.from_rules(
        params, FAMILY_RULES[family], num_heads=heads, num_kv_heads=kv_heads, head_dim=16, num_layers=layers, layered="layers/"
    )


def _abstract_inputs(layout: ModelLayout, n: int):
    kinds = tuple(p for p in layout.attention_blocks() if p[1] == "kernel")
    leaves = {path: jax.ShapeDtypeStruct((n, *spec.shape), jnp.float32) for path, spec in layout.specs.items()}
    weights = {}
    for block, kind in kinds:
        path = layout.block_sources(block, kind)[0]
        view = jax.eval_shape(lambda x, b=block, p=path: layout.view(p, x, b, per_layer=True), jax.ShapeDtypeStruct(layout.spec(path).shape[1:], jnp.float32))
        weights[f"{block}/{kind}"] = jax.ShapeDtypeStruct((layout.num_layers, *view.shape), jnp.float32)
    return kinds, leaves, weights, jax.ShapeDtypeStruct((n,), jnp.float32)


@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
def test_kernel_lowers_to_triton_for_every_layout(family):
    layout = _layout(family)
    kinds, leaves, weights, scale = _abstract_inputs(layout, n=16)

    def products(a, sa, w, b, sb):
        return _pallas.kernel_products(
            a, sa, w, b, sb, layout=layout, kinds=kinds, transform_a="square", transform_b="abs", split_k=2, precision="highest",
            interpret=False,
        )

    lowered = jax.jit(products).trace(leaves, scale, weights, leaves, scale).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 4  # one kernel per block, no other pass over the leaves


def test_tiles_are_the_largest_power_of_two_dividing_a_row():
    assert _pallas.tile_chunk(24, 1)[0] == 8 and _pallas.tile_chunk(768, 16)[0] == 256 and _pallas.tile_chunk(80, 16)[0] == 16
    with pytest.raises(ConfigError, match="factor 16"):  # Triton's smallest dot side
        _pallas.tile_chunk(24, 16)


def test_pipelined_tiles_fit_shared_memory():
    """64 + 64 float32 samples at chunk 256 and 3 stages asked an H200 for 396 KB of shared memory."""
    limit = _pallas.SHARED_MEMORY_BYTES
    for rows, itemsize in [(129, 4), (33, 4), (33, 2), (257, 4), (513, 4)]:
        chunk, stages = _pallas.tile_chunk(768, 16, tile_rows=rows, itemsize=itemsize)
        assert chunk >= 16 and stages * rows * chunk * itemsize <= limit
        assert chunk == 256 or stages == 1 or 2 * stages * rows * chunk * itemsize > limit  # the widest that fits
    assert _pallas.tile_chunk(768, 16, tile_rows=33, itemsize=2) == (256, 3)
    assert _pallas.tile_chunk(768, 16, tile_rows=513, itemsize=4)[1] < _pallas.MAX_STAGES  # fewer stages before narrower than 16
    with pytest.raises(ConfigError, match="shared memory"):
        _pallas.tile_chunk(768, 16, tile_rows=4097, itemsize=4)


@pytest.mark.parametrize("planned, n, expected", [(64, 64, 64), (100, 50, 64), (6, 6, 16), (3, 6, 16), (40, 100, 32), (64, 300, 64)])
def test_sample_chunks_are_powers_of_two(planned, n, expected):
    assert _pallas.sample_chunk(planned, n) == expected


@pytest.mark.parametrize("family, block, expected", [
    ("gpt2", "q", (1, 0)), ("gpt2", "k", (1, 4)), ("gpt2", "v", (1, 8)), ("gpt2", "o", (1, 0)),
    ("gpt_neox", "q", (3, 0)), ("gpt_neox", "k", (3, 1)), ("gpt_neox", "v", (3, 2)),
    ("llama", "k", (1, 0)), ("llama", "o", (1, 0)),
])
def test_head_blocks_follow_the_fused_layouts(family, block, expected):
    """GPT-2: [Q|K|V] columns, each block H heads wide; NeoX: [head, (q, k, v), head_dim]."""
    layout = _layout(family)
    assert _pallas.head_blocks(layout, layout.block_sources(block, "kernel")[0], block) == expected


def test_heatmap_warns_that_pallas_is_interpreted_off_a_gpu(hf_checkpoint):
    model = fisherjax.load_pretrained(hf_checkpoint("gpt2")[0])
    rng = np.random.default_rng(0)
    paths = [p for b, k in model.layout.attention_blocks() for p in model.layout.block_sources(b, k)]
    grads = {p: rng.standard_normal((4, *model.layout.spec(p).shape)).astype(np.float32) for p in set(paths)}
    task = SampleGrads.from_grads(grads, np.full(4, 3), np.arange(4))
    with pytest.warns(UserWarning, match="interpret mode"):
        qkov.heatmap(task, task, model.layout, min_fisher_samples=1, contraction="pallas")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_interpret_mode_matches_looped_on_the_synthetic_shapes(dtype):
    """Stored leaves with head_dim 16 (the Triton tile) and a split of 4, float32 or stored in
    bfloat16 (``--contribution-dtype``; tiles are widened as they are loaded): same sums as the CPU
    kernel; a second call with the same shapes (the tasks swapped) does not retrace."""
    layout = _layout("gpt_neox")
    kinds, leaves, weights, _ = _abstract_inputs(layout, n=16)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    a = {p: jax.random.normal(next(keys), s.shape).astype(dtype) for p, s in leaves.items()}
    b = {p: jax.random.normal(next(keys), s.shape).astype(dtype) for p, s in leaves.items()}
    w = {k: jax.random.uniform(next(keys), s.shape) for k, s in weights.items()}
    sa, sb = jax.random.uniform(next(keys), (16,)), jax.random.uniform(next(keys), (16,))
    common = dict(layout=layout, kinds=kinds, transform_a="square", transform_b="abs", precision="highest")
    chex.clear_trace_counter()
    products = jax.jit(chex.assert_max_traces(_pallas.kernel_products, n=1), static_argnames=_pallas.KERNEL_PRODUCTS_STATIC)
    for x, sx, y, sy in ((a, sa, b, sb), (b, sb, a, sa)):
        got = products(x, sx, w, y, sy, split_k=4, interpret=True, **common)
        expected = _looped.leaf_sums_jit(x, sx, w, y, sy, 0, piece_floats=2**19, **common)
        for block in qkov.BLOCKS:
            np.testing.assert_allclose(np.asarray(got[block]), np.asarray(expected[block]), rtol=2e-5, atol=1e-6)
