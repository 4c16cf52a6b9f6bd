"""Head categories in every phase: the group Fisher keyed by category, masks by category, and the
importance / masks / conflicts / QK-OV reports naming each head's category (checked against sums
and lookups written here from the layout's own head views)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_task, tiny_config
from fisherjax.analysis import importance, masks
from fisherjax.data import batches
from fisherjax.fisher.collect import collect
from fisherjax.layout import flatten
from fisherjax.models import Model
from fisherjax.report import categories

LABELS = np.array([["induction", "previous_token", "content", "content"], ["positional", "induction", "mixed", "same_token"]])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def collected(request):
    model = Model.init(tiny_config(request.param), seed=1)
    fisher = collect(model, batches(random_task("t", 6), 6), task="t", progress=False)
    return model, fisher


def test_category_group_fisher_splits_each_leaf_by_the_heads_labels(collected):
    model, fisher = collected
    layout = model.layout
    found = importance.category_group_fisher(fisher, layout, LABELS)
    assert found, "no attention leaf got category groups"
    for path, groups in found.items():
        assert set(groups) == {f"{c}_heads" for c in np.unique(LABELS)}
        spec = layout.spec(path)
        per_block = {"head": None} if spec.role.value != "qkv" else {f"head_{b}": b for b in "qkv"}
        total = 0.0
        for key, block in per_block.items():
            values = np.asarray(fisher.group_fisher[path][key], np.float64)
            block = block or spec.role.value
            if block in ("k", "v"):  # each query head takes 1/G of the kv head it reads
                values = np.stack([values[:, layout.kv_head_of[h]] / layout.kv_groups for h in range(layout.num_heads)], -1)
            total = total + values
        by_hand = {c: np.array([sum(total[l, h] for h in range(layout.num_heads) if LABELS[l, h] == c) for l in range(layout.num_layers)])
                   for c in np.unique(LABELS)}
        for c, expected in by_hand.items():
            np.testing.assert_allclose(groups[f"{c}_heads"], expected, rtol=1e-6, atol=1e-30)
        np.testing.assert_allclose(sum(groups.values()), total.sum(-1), rtol=1e-6)  # the categories partition each layer


def test_category_masks_keep_or_prune_exactly_the_labelled_heads(collected):
    model, _ = collected
    layout = model.layout
    only = masks.category_mask(layout, LABELS, ["induction"])
    without = masks.category_mask(layout, LABELS, ["induction"], keep=False)
    np.testing.assert_array_equal(only.keep["head"], LABELS == "induction")
    np.testing.assert_array_equal(without.keep["head"], LABELS != "induction")
    assert without.sparsity == pytest.approx(2 / 8)
    # the O kernel rows of a pruned head are zero after applying the mask, the others untouched
    params = masks.apply_mask(model.params, without)
    o_path = layout.block_sources("o", "kernel")[0]
    o_view = np.asarray(layout.view(o_path, flatten(params)[o_path]))  # [L, H, hd, d]
    original = np.asarray(layout.view(o_path, flatten(model.params)[o_path]))
    for layer in range(2):
        for head in range(4):
            if LABELS[layer, head] == "induction":
                assert not o_view[layer, head].any()
            else:
                np.testing.assert_array_equal(o_view[layer, head], original[layer, head])
    with pytest.raises(Exception, match="labels have shape"):
        masks.category_mask(layout, LABELS[:1], ["induction"])


def test_report_helpers_name_heads_and_average_per_category():
    kv_head_of = np.array([0, 0, 1, 1])
    assert categories.name_group("L1.q.h2", LABELS, kv_head_of) == "L1.q.h2 (mixed)"
    assert categories.name_group("L0.k.h0", LABELS, kv_head_of) == "L0.k.h0 (induction/previous_token)"
    assert categories.name_group("layers/mlp/up@L1", LABELS, kv_head_of) == "layers/mlp/up@L1"
    values = np.arange(8.0).reshape(2, 4)
    means = categories.per_category(values, LABELS)
    assert means["induction"] == pytest.approx((0 + 5) / 2) and means["content"] == pytest.approx(2.5)
    kv_values = np.array([[1.0, 3.0], [5.0, np.nan]])  # k/v maps over kv heads, spread onto their query heads
    means = categories.per_category(kv_values, LABELS, "k", kv_head_of)
    assert means["induction"] == pytest.approx((1.0 + 5.0) / 2) and means["content"] == pytest.approx(3.0)
    assert means["positional"] == pytest.approx(5.0) and means["same_token"] is None


def test_the_run_probes_the_demo_on_its_letters_and_takes_thresholds_from_the_command_line(tmp_path):
    """``fisherjax analyze``'s categories: the demo's own probes by default (its induction head is
    found), ``--probe-tokens`` / ``--probe-length`` / ``--head-threshold`` reach ``categorise``."""
    from fisherjax import demo
    from fisherjax.pipeline import AnalysisConfig, categorise_heads

    model = demo.load()
    default = categorise_heads(model, AnalysisConfig(out=tmp_path / "a"))
    assert default.labels[1, 0] == "induction" and (default.labels == "induction").sum() == 1
    strict = categorise_heads(model, AnalysisConfig(out=tmp_path / "b", head_thresholds=(("induction", 0.99),)))
    assert strict.thresholds.induction == 0.99 and not (strict.labels == "induction").any()
    np.testing.assert_array_equal(strict.scores.induction, default.scores.induction)
    # every ordinary token at the library's default length: the demo's digits and operators hide its
    # copy mechanism, which is why the demo is probed on letters
    everything = categorise_heads(model, AnalysisConfig(out=tmp_path / "c", model=demo.checkpoint_dir(), probe_length=16))
    assert everything.scores.induction[1, 0] < default.scores.induction[1, 0]
    letters = categorise_heads(model, AnalysisConfig(out=tmp_path / "d", model=demo.checkpoint_dir(),
                                                     probe_tokens="abcdefghijklmnopqrstuvwxyz", probe_length=16))
    np.testing.assert_allclose(letters.scores.induction, default.scores.induction)
