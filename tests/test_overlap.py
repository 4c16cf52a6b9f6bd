"""Phase 4 (mask overlap): Jaccard, shared / unique regions per layer, merge advice, figure."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fisherjax.analysis import masks, overlap
from fisherjax.report import masks as overlap_report
from fisherjax.config import DecoderConfig, RopeConfig
from fisherjax.errors import ConfigError, DataError
from fisherjax.fisher.groups import group_sizes, groups_of_elementwise
from fisherjax.fisher.state import TaskFisher
from fisherjax.layout import ModelLayout, flatten, layout_for


def layout_of() -> ModelLayout:
    from flax import nnx

    from fisherjax.models.decoder import Decoder

    cfg = DecoderConfig(
        model_type="llama", family="llama", vocab_size=61, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=8, intermediate_size=24, max_position_embeddings=64, norm_eps=1e-5, activation="silu",
        tie_word_embeddings=False, rope=RopeConfig(10000.0, 8),
    )
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0)))))
    return layout_for(cfg, jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract))


def random_fisher(layout: ModelLayout, task: str, seed: int) -> TaskFisher:
    rng = np.random.default_rng(seed)
    diag = {p: rng.gamma(0.5, 1.0, size=s.shape) for p, s in layout.specs.items()}
    groups = {p: {k: np.asarray(v) for k, v in groups_of_elementwise(layout, p, d).items()} for p, d in diag.items()}
    return TaskFisher(task, groups, {p: group_sizes(layout, p) for p in diag}, n_samples=8, diagonal=diag)


@pytest.fixture(scope="module")
def setup():
    layout = layout_of()
    return layout, random_fisher(layout, "math", 0), random_fisher(layout, "copy", 1)


def set_jaccard(a, b) -> float:
    sa, sb = set(np.flatnonzero(a)), set(np.flatnonzero(b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def test_jaccard_matches_sets():
    rng = np.random.default_rng(0)
    for p in (0.1, 0.5, 0.9):
        a, b = rng.random(500) < p, rng.random(500) < p
        assert overlap.jaccard(a, b) == pytest.approx(set_jaccard(a, b))
    assert overlap.jaccard(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert overlap.jaccard(np.ones(4, bool), np.zeros(4, bool)) == 0.0
    with pytest.raises(DataError, match="shapes"):
        overlap.jaccard(np.ones(3, bool), np.ones(4, bool))


def test_unit_overlap_counts(setup):
    layout, fa, fb = setup
    ma, mb = (masks.structured_mask(f, layout, 0.5, unit="head") for f in (fa, fb))
    o = overlap.mask_overlap(ma, mb)
    ka, kb = ma.keep["head"], mb.keep["head"]
    assert o.level == "unit" and o.unit == "head" and (o.task_a, o.task_b) == ("math", "copy")
    assert o.jaccard == pytest.approx(set_jaccard(ka.reshape(-1), kb.reshape(-1)))
    assert (o.shared, o.only_a, o.only_b, o.neither, o.total) == (
        int((ka & kb).sum()), int((ka & ~kb).sum()), int((~ka & kb).sum()), int((~ka & ~kb).sum()), 16
    )
    assert o.layers.tolist() == [0, 1, 2, 3]
    for layer in range(4):
        assert o.layer_jaccard[layer] == pytest.approx(set_jaccard(ka[layer], kb[layer]))
        assert o.layer_shared[layer] == (ka[layer] & kb[layer]).sum()
        assert o.layer_total[layer] == 4
    same = overlap.mask_overlap(ma, ma)
    assert same.jaccard == 1.0 and same.only_a == same.only_b == 0


def test_parameter_overlap_counts(setup):
    layout, fa, fb = setup
    ma, mb = (masks.unstructured_mask(f, layout, 0.7) for f in (fa, fb))
    o = overlap.mask_overlap(ma, mb, layout)
    assert o.level == "parameter"
    flat_a, flat_b = flatten(ma.tree), flatten(mb.tree)
    a = np.concatenate([flat_a[p].reshape(-1) for p in sorted(flat_a)])
    b = np.concatenate([flat_b[p].reshape(-1) for p in sorted(flat_a)])
    assert o.jaccard == pytest.approx(set_jaccard(a, b))
    assert o.total == a.size
    assert o.layers.tolist() == [-1, 0, 1, 2, 3]
    for i, layer in enumerate(o.layers):
        if layer < 0:
            pa = np.concatenate([flat_a[p].reshape(-1) for p in sorted(flat_a) if not layout.spec(p).layered])
            pb = np.concatenate([flat_b[p].reshape(-1) for p in sorted(flat_a) if not layout.spec(p).layered])
        else:
            pa = np.concatenate([flat_a[p][layer].reshape(-1) for p in sorted(flat_a) if layout.spec(p).layered])
            pb = np.concatenate([flat_b[p][layer].reshape(-1) for p in sorted(flat_a) if layout.spec(p).layered])
        assert o.layer_jaccard[i] == pytest.approx(set_jaccard(pa, pb))
        assert (o.layer_only_a[i], o.layer_only_b[i]) == ((pa & ~pb).sum(), (~pa & pb).sum())
    # Structured masks of different units are compared over parameters.
    heads, neurons = masks.structured_mask(fa, layout, 0.5, unit="head"), masks.structured_mask(fb, layout, 0.5, unit="neuron")
    mixed = overlap.mask_overlap(heads, neurons, layout)
    assert mixed.level == "parameter" and 0 < mixed.jaccard < 1


def test_empty_and_mismatched(setup):
    layout, fa, fb = setup
    ma, mb = (masks.structured_mask(f, layout, 1.0) for f in (fa, fb))
    o = overlap.mask_overlap(ma, mb)
    assert o.jaccard == 1.0 and o.shared + o.only_a + o.only_b == 0 and o.neither == 16
    heads = masks.structured_mask(fa, layout, 0.5)
    neurons = masks.structured_mask(fb, layout, 0.5, unit="neuron")
    with pytest.raises(DataError, match="same unit"):
        overlap.mask_overlap(heads, neurons, level="unit")
    with pytest.raises(ConfigError, match="layout"):
        overlap.mask_overlap(heads, neurons)
    fewer = {k: v for k, v in flatten(heads.tree).items() if k != "lm_head/kernel"}
    with pytest.raises(DataError, match="lm_head"):
        overlap.mask_overlap(fewer, flatten(heads.tree), layout)


@pytest.mark.parametrize(("j", "level"), [(0.9, "high"), (0.7, "moderate"), (0.55, "moderate"), (0.4, "moderate"), (0.39, "low"), (0.0, "low")])
def test_merge_advice_thresholds(j, level):
    fields = dict(
        task_a="math", task_b="copy", level="unit", unit="head", jaccard=j, shared=3, only_a=1, only_b=2, neither=10,
        total=16, layers=np.array([0, 1]), layer_jaccard=np.array([0.25, 0.8]),
    )
    advice = overlap.merge_advice(fields)
    assert advice.level == level
    assert f"{j:.2f}" in advice.text and "3 shared" in advice.text and "1 only math" in advice.text
    assert "0.80 (layer 1)" in advice.text and "0.25 (layer 0)" in advice.text


def test_summarize_and_plot(setup, tmp_path):
    layout, fa, fb = setup
    levels = (0.5, 0.7, 0.9)
    per_task = {f.task: [masks.structured_mask(f, layout, s) for s in levels] for f in (fa, fb)}
    summary = overlap_report.overlap_summary(per_task, layout)
    json.dumps(summary)
    entries = summary["pairs"]["math|copy"]
    assert [e["sparsity"] for e in entries] == list(levels)
    assert entries[0]["advice"]["level"] in ("high", "moderate", "low")
    overlaps = [overlap.mask_overlap(a, b) for a, b in zip(*per_task.values(), strict=True)]
    fig = overlap_report.overlap_figure(overlaps)
    fig.savefig(tmp_path / "overlap.png")
    assert (tmp_path / "overlap.png").stat().st_size > 0
    with pytest.raises(DataError, match="same number"):
        overlap_report.overlap_summary({"math": per_task["math"], "copy": per_task["copy"][:1]}, layout)


def test_advice_text_names_layers_a_reader_can_use():
    """No "from 1.00 (layer 0) to 1.00 (layer 0)", no "layer -1", and a layer where neither task
    keeps anything is said to keep nothing rather than counted as agreement."""
    base = dict(task_a="math", task_b="copy", level="unit", unit="head", neither=4, total=12)
    same = overlap.merge_advice(dict(base, jaccard=1.0, shared=4, only_a=0, only_b=0, layers=np.array([0, 1]), layer_jaccard=np.array([1.0, 1.0]),
                                     layer_shared=np.array([2, 2]), layer_only_a=np.array([0, 0]), layer_only_b=np.array([0, 0])))
    assert "by layer" not in same.text
    empty_layer = overlap.merge_advice(dict(base, jaccard=0.5, shared=2, only_a=1, only_b=1, layers=np.array([-1, 0, 1]),
                                            layer_jaccard=np.array([0.2, 1.0, 0.8]), layer_shared=np.array([1, 0, 1]),
                                            layer_only_a=np.array([1, 0, 0]), layer_only_b=np.array([1, 0, 0])))
    assert "from 0.20 (outside the layers) to 0.80 (layer 1)" in empty_layer.text
    assert "nothing kept by either task in layer 0" in empty_layer.text and "layer -1" not in empty_layer.text
    nothing = overlap.merge_advice(dict(base, jaccard=1.0, shared=0, only_a=0, only_b=0, neither=12, layers=np.array([0]), layer_jaccard=np.array([1.0])))
    assert nothing.level == "none" and "nothing to compare" in nothing.text
