"""Sharded pair phases: ``mesh=`` on ``qkov.heatmap``, ``qkov.permutation_test`` and
``conflicts.detect`` / ``pairwise_cosines`` equals one device.

The meshes (2, 2) ``("data", "model")`` and (slow) (4,) ``("data",)`` need four devices, which a CPU only
has when ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` is set before jax is imported: the
comparisons run in one subprocess (:data:`CHECK`, tasks built once) that writes what it found as
JSON. A bad mesh, and a one-device mesh, are checked in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import abstract_layout, tiny_config
from fisherjax.analysis import conflicts, qkov
from fisherjax.errors import ConfigError
from fisherjax.fisher.state import SampleGrads

TOLERANCE = 1e-5
"""Relative difference allowed (float32 sums in another order): entrywise for scores, dot products
and cosines; ‖sharded − single‖ / ‖single‖ for means and contrasts (``layer_head_avg``, the
permutation statistic, bootstrap bounds), whose signed entries may cancel."""

CHECK = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import warnings
import numpy as np
import jax
from conftest import abstract_layout, random_task, tiny_config
from fisherjax import Model, collect
from fisherjax.analysis import conflicts, qkov
from fisherjax.analysis.conflicts import gram as conflicts_gram
from fisherjax.analysis.conflicts.sources import as_stream, grouping_for
from fisherjax.curvature import kfac as K
from fisherjax.data import batches
from fisherjax.fisher import factored
from fisherjax.fisher.options import attention_paths
from fisherjax.fisher.state import SampleGrads
from fisherjax.sharding import make_mesh

warnings.simplefilter("ignore")
assert len(jax.devices()) == 4


def err(got, want):
    """||got - want|| / ||want|| (float64): for means and contrasts, whose entries may cancel."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def entrywise(got, want):
    """Largest |got - want| / (|want| + 1e-2 max|want|): for scores, dot products and cosines —
    relative where an entry is at least a hundredth of the largest, and below that relative to
    that hundredth: an entry that is a small difference of large float32 terms (a K-FAC score of
    3e-4 among scores of 7) carries their rounding, 1e-8 of the largest, and how it rounds depends
    on the CPU's vector width (AVX2 against AVX-512)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    floor = 1e-2 * max(float(np.abs(want).max()), 1e-30)
    return float(np.max(np.abs(got - want) / (np.abs(want) + floor)))


def same(a, b):
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def top_keys(result):
    return [(t["block"], t["layer"], t["head"], t["sample_a"], t["sample_b"]) for t in qkov.top_conflicts(result, 12)]


def planted(layout, n, seed, signs):
    """Per-sample gradients sign_i * c + noise with one common direction c (seed 0)."""
    common, rng = np.random.default_rng(0), np.random.default_rng(seed)
    paths = sorted({p for b, k in layout.attention_blocks() for p in layout.block_sources(b, k)})
    grads = {}
    for p in paths:
        shape = layout.spec(p).shape
        c = common.standard_normal(shape)
        grads[p] = (np.asarray(signs, float).reshape((-1,) + (1,) * len(shape)) * c
                    + 0.3 * rng.standard_normal((n,) + shape)).astype(np.float32)
    return SampleGrads.from_grads(grads, rng.integers(3, 9, size=n), np.arange(1000 * seed, 1000 * seed + n))


# Real per-sample gradients of a tiny GPT-2 (fused QKV with biases): A has 7 samples (not a
# multiple of 4: padding), B 6, A' 5; synthetic gradients for a tiny Llama (grouped-query
# attention, no biases) with a planted conflict: B's last three samples oppose A's direction.
gpt2 = Model.init(tiny_config("gpt2"), seed=0)
tasks = {name: collect(gpt2, batches(random_task(name, n, seed), 8), task=name, keep_sample_grads=True, progress=False)
         for name, n, seed in (("a", 7, 1), ("b", 6, 2), ("held", 5, 3))}
# The same A and B with their kernels kept as token factors (issue 23): read on a mesh as on one device.
FA, FB = (collect(gpt2, batches(random_task(name, n, seed), 8), task=name, keep_sample_grads=True, sample_grads_factors=True,
                  progress=False) for name, n, seed in (("a", 7, 1), ("b", 6, 2)))
llama = abstract_layout(tiny_config("llama"))
la, lb = planted(llama, 11, 1, [1] * 11), planted(llama, 6, 2, [1, 1, 1, -1, -1, -1])
MIN = dict(min_fisher_samples=3)
A, B, H = tasks["a"], tasks["b"], tasks["held"]
LLAMA_FLOATS = sum(int(np.prod(llama.spec(p).shape)) for p in attention_paths(llama)) // llama.num_layers  # a sample's, a layer's
GPT2_FLOATS = sum(int(np.prod(gpt2.layout.spec(p).shape)) for p in attention_paths(gpt2.layout)) // gpt2.layout.num_layers
taken = []
take = factored.FactoredGrads.take


def counted_take(self, positions, axis):
    taken.append(axis)
    return take(self, positions, axis)


factored.FactoredGrads.take = counted_take

single = {
    "gpt2": qkov.heatmap(A, B, gpt2.layout, **MIN),
    "llama": qkov.heatmap(la, lb, llama, contraction="batched", variant="signed", split_k=4, **MIN),
    "perm": qkov.permutation_test(A, B, H, gpt2.layout, n_permutations=300, seed=3, **MIN),
    "groups": conflicts.detect(A, B, layout=gpt2.layout, scope="groups"),
    "planted": conflicts.detect(la, lb, layout=llama, reference="a"),
    "chunked": conflicts.detect(A, B, layout=gpt2.layout, reference_split=H, chunk_size=3, null="normal"),
}
fit_a, held_a = qkov.heldout_split(A, 3 / 7, seed=2)
single["perm_split"] = qkov.permutation_test(fit_a, B, held_a, gpt2.layout, n_permutations=300, seed=3, **MIN)
single["gpt2_boot"] = qkov.bootstrap_layer_head_avg(single["gpt2"], n_bootstrap=64, seed=1, chunk=32)

single["chunked4"] = conflicts.detect(A, B, layout=gpt2.layout, chunk_size=4)
# QK-OV's kfac variant: task A's K-FAC factors restricted to the heads
KF = K.attention_factors(K.kfac_factors(gpt2, gpt2.params, list(batches(random_task("a", 7, 1), 8))), gpt2.layout)
single["kfac"] = qkov.heatmap(A, B, gpt2.layout, variant="kfac", kfac=KF, **MIN)

# Kept token factors are formed where the mesh places them: record where each formation ran, and
# count reads that formed gradients for the host.
formed_on, host_reads = [], []
_form, _getitem = factored.form, factored.FactoredGrads.__getitem__


def recording_form(inputs, deltas, shape):
    formed_on.append((len(inputs.sharding.device_set), bool(inputs.sharding.is_fully_replicated)))
    return _form(inputs, deltas, shape)


def counted_getitem(self, key):
    host_reads.append(key)
    return _getitem(self, key)


factored.form, factored.FactoredGrads.__getitem__ = recording_form, counted_getitem

# Stored tasks are read a parameter slice at a time on a mesh too: record the devices each
# sliced call's rows land on.
sliced_calls = []
_sharded_slice_dots = conflicts_gram.sharded_slice_dots


def counted_slice_dots(*args):
    run = _sharded_slice_dots(*args)

    def counted(rows, columns, weight):
        out = run(rows, columns, weight)
        sliced_calls.append(min(len(x.sharding.device_set) for x in jax.tree.leaves(out)))
        return out

    return counted


conflicts_gram.sharded_slice_dots = counted_slice_dots

found = {}
for name, mesh in ((name, {"(4,)": make_mesh(4), "(2, 2)": make_mesh(2, 2)}[name]) for name in sys.argv[2:]):
    f = found[name] = {}
    sliced_calls.clear()
    # QK-OV heatmap, gathered: the looped kernel (CPU default) on TaskFishers.
    got = qkov.heatmap(A, B, gpt2.layout, mesh=mesh, **MIN)
    f["gpt2_scores"] = entrywise(got.scores, single["gpt2"].scores)
    f["gpt2_avg"] = err(got.layer_head_avg, single["gpt2"].layer_head_avg)
    f["gpt2_ids"] = same(got.sample_ids_a, single["gpt2"].sample_ids_a) and same(got.sample_ids_b, single["gpt2"].sample_ids_b)
    # Kept on the devices: summaries reduced there, the scores split over all four devices.
    kept = qkov.heatmap(A, B, gpt2.layout, mesh=mesh, gather_scores=False, **MIN)
    padded = kept.scores.padded
    f["kept_shape"] = list(kept.scores.shape) == list(single["gpt2"].scores.shape)
    f["kept_devices"] = len(padded.sharding.device_set)
    f["kept_rows"] = sorted({(s.index[2].start, s.data.shape[2]) for s in padded.addressable_shards})
    f["kept_avg"] = err(kept.layer_head_avg, single["gpt2"].layer_head_avg)
    f["kept_scores"] = entrywise(np.asarray(kept.scores), single["gpt2"].scores)
    f["kept_top"] = top_keys(kept) == top_keys(single["gpt2"])
    boot = qkov.bootstrap_layer_head_avg(kept, n_bootstrap=64, seed=1, chunk=32)
    f["kept_boot"] = max(err(boot.low, single["gpt2_boot"].low), err(boot.high, single["gpt2_boot"].high))
    # The batched kernel, GQA, signed scores (top conflicts most negative first).
    got = qkov.heatmap(la, lb, llama, mesh=mesh, gather_scores=False, contraction="batched", variant="signed", split_k=4, **MIN)
    f["llama_scores"] = entrywise(np.asarray(got.scores), single["llama"].scores)
    f["llama_avg"] = err(got.layer_head_avg, single["llama"].layer_head_avg)
    f["llama_top"] = top_keys(got) == top_keys(single["llama"])
    # Tiles too small for task B: by parts (q, k, v, o), each a kv head (and its two query heads)
    # at a time, the k and v parts' row chunks larger than q's and o's, all dividing a device's rows.
    got = qkov.heatmap(la, lb, llama, mesh=mesh, gather_scores=False, contraction="batched", variant="signed", split_k=4,
                       memory_budget_bytes=12 * LLAMA_FLOATS, **MIN)
    f["llama_parts_scores"] = entrywise(np.asarray(got.scores), single["llama"].scores)
    # Kept token factors in groups of heads (GPT-2's fused QKV a head at a time, O two): each read
    # takes its group's columns of the factors.
    taken.clear()
    got = qkov.heatmap(FA, FB, gpt2.layout, mesh=mesh, memory_budget_bytes=8 * GPT2_FLOATS, **MIN)
    f["factors_heads_scores"] = err(got.scores, single["gpt2"].scores)
    f["factors_heads_taken"] = len(taken)
    # The kfac variant: A's rows of each tile split over the devices, its sums gathered tile by tile.
    got = qkov.heatmap(A, B, gpt2.layout, mesh=mesh, variant="kfac", kfac=KF, **MIN)
    f["kfac_scores"] = entrywise(got.scores, single["kfac"].scores)
    f["kfac_avg"] = err(got.layer_head_avg, single["kfac"].layer_head_avg)
    # Permutation test: same seed, same permutations; only column means gathered.
    perm = qkov.permutation_test(A, B, H, gpt2.layout, n_permutations=300, seed=3, mesh=mesh, **MIN)
    f["perm_observed"] = err(perm.observed, single["perm"].observed)
    f["perm_pvalues"] = same(perm.pvalues, single["perm"].pvalues)
    f["perm_qvalues"] = err(perm.qvalues, single["perm"].qvalues)
    f["perm_significant"] = same(perm.significant, single["perm"].significant)
    # The same test on a held-out split of A read in place (rows of A mapped onto the devices).
    split = qkov.heldout_permutation_test(A, B, gpt2.layout, fraction=3 / 7, split_seed=2, n_permutations=300, seed=3, mesh=mesh, **MIN)
    f["perm_split_observed"] = err(split.observed, single["perm_split"].observed)
    f["perm_split_pvalues"] = same(split.pvalues, single["perm_split"].pvalues)
    # Conflicts: per-group scope on real gradients; the planted conflict; chunks and a reference split.
    for key, kwargs, (a, b) in (("groups", dict(layout=gpt2.layout, scope="groups"), (A, B)),
                                ("planted", dict(layout=llama, reference="a"), (la, lb)),
                                ("chunked", dict(layout=gpt2.layout, reference_split=H, chunk_size=3, null="normal"), (A, B))):
        report, want = conflicts.detect(a, b, mesh=mesh, **kwargs), single[key]
        f[f"{key}_cosines"] = entrywise(report.cosines, want.cosines)
        # per group a pair's p-value is NaN where none of its groups is at most alpha: NaN in the same places
        f[f"{key}_untested"] = same(np.isnan(report.pvalues), np.isnan(want.pvalues))
        f[f"{key}_pvalues"] = float(np.nanmax(np.abs(report.pvalues - want.pvalues)))
        f[f"{key}_significant"] = same(report.significant, want.significant)
        f[f"{key}_ids"] = same(report.sample_ids_a, want.sample_ids_a) and same(report.sample_ids_b, want.sample_ids_b)
        if want.group_tests is not None:
            f[f"{key}_group_dots"] = entrywise(report.gram.group_dots, want.gram.group_dots)
            f[f"{key}_group_kept"] = same(report.group_tests.index, want.group_tests.index)
            f[f"{key}_group_pvalues"] = (float(np.max(np.abs(report.group_tests.pvalues - want.group_tests.pvalues), initial=0.0))
                                         if f[f"{key}_group_kept"] else float("inf"))
    f["planted_found"] = int(single["planted"].n_significant)
    # against the gradients' results: formed in another order, so compared over the whole array
    # (GPT-2's key-bias groups are rounding noise, whose entries differ relatively by more)
    formed_on.clear(), host_reads.clear()
    f["factors_scores"] = err(qkov.heatmap(FA, FB, gpt2.layout, mesh=mesh, **MIN).scores, single["gpt2"].scores)
    report = conflicts.detect(FA, FB, mesh=mesh, layout=gpt2.layout, scope="groups")
    f["factors_cosines"] = err(report.cosines, single["groups"].cosines)
    f["factors_group_dots"] = err(report.gram.group_dots, single["groups"].gram.group_dots)
    f["factors_kfac_scores"] = err(qkov.heatmap(FA, FB, gpt2.layout, mesh=mesh, variant="kfac", kfac=KF, **MIN).scores,
                                   single["kfac"].scores)
    report = conflicts.detect(FA, FB, mesh=mesh, layout=gpt2.layout, chunk_size=4)  # chunk by chunk, not slice by slice
    f["factors_chunked_cosines"] = err(report.cosines, single["chunked4"].cosines)
    # each device formed its own rows (split) or all of them (replicated): none on one device, none on the host
    f["factors_formed"] = sorted({"split" if n == 4 and not whole else "replicated" if n == 4 else f"{n} device(s)"
                                  for n, whole in formed_on})
    f["factors_host_reads"] = len(host_reads)
    # The row side of a Gram is split over all four devices.
    stream = as_stream(A, None, "A")
    rows, _, _ = conflicts_gram.split_sides({"a": stream}, grouping_for(stream.shapes, gpt2.layout), None, 64, mesh)
    features = next(iter(rows["a"]()))[1]
    f["gram_rows_devices"] = min(len(x.sharding.device_set) for x in features.values())
    f["gram_rows_per_device"] = sorted({s.data.shape[0] for x in features.values() for s in x.addressable_shards})
    f["sliced_calls"], f["sliced_devices"] = len(sliced_calls), min(sliced_calls, default=0)

with open(sys.argv[1], "w") as out:
    json.dump(found, out, indent=1)
'''


# The (2, 2) mesh by default: it splits the rows over "data" and the parameters over "model"; the
# (4,) mesh (rows alone, two a device) is slow, its checks the same.
@pytest.fixture(scope="module", params=["(2, 2)", pytest.param("(4,)", marks=pytest.mark.slow)])
def sharded(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharded_analysis") / "found.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # CHECK adds its four devices to the run's XLA_FLAGS
    proc = subprocess.run([sys.executable, "-c", CHECK, str(out), request.param], env=env, cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(out.read_text())
    assert set(found) == {request.param}
    return found


def test_sharded_pair_phases_equal_one_device(sharded):
    for mesh, f in sharded.items():
        errors = {k: v for k, v in f.items() if isinstance(v, float)}
        close = {k: v for k, v in errors.items() if not k.endswith("pvalues")}
        assert max(close.values()) <= TOLERANCE, (mesh, close)
        # p-values: empirical nulls give the same counts; the normal null differs by rounding.
        assert max(v for k, v in errors.items() if k.endswith("pvalues")) <= 1e-6, (mesh, errors)
        flags = [k for k, v in f.items() if isinstance(v, bool)]
        assert {"gpt2_ids", "kept_shape", "kept_top", "llama_top", "perm_pvalues", "perm_significant", "planted_significant"} <= set(flags)
        assert {"factors_scores", "factors_cosines", "factors_group_dots", "factors_chunked_cosines", "kfac_scores", "kfac_avg",
                "factors_kfac_scores", "llama_parts_scores", "factors_heads_scores"} <= set(errors), (mesh, errors)
        assert f["factors_heads_taken"] > 0
        assert all(f[k] for k in flags), (mesh, {k: f[k] for k in flags})
        assert f["planted_found"] > 0  # the planted conflict is found, and found the same on the mesh


def test_sharded_scores_and_gram_rows_are_on_all_four_devices(sharded):
    for mesh, f in sharded.items():
        # 7 samples of A padded to 8: two contiguous rows per "data" shard (replicated over "model").
        assert f["kept_devices"] == 4 and f["gram_rows_devices"] == 4, (mesh, f)
        # stored tasks' Grams went slice by slice over all four devices (not chunk pairs)
        assert f["sliced_calls"] > 0 and f["sliced_devices"] == 4, (mesh, f["sliced_calls"], f["sliced_devices"])
        data = 4 if mesh == "(4,)" else 2
        assert f["kept_rows"] == [[start, 8 // data] for start in range(0, 8, 8 // data)], (mesh, f["kept_rows"])
        assert f["gram_rows_per_device"] == [8 // data], (mesh, f["gram_rows_per_device"])
        # kept token factors were formed on the devices that read them, never on one device or for the host
        assert f["factors_formed"] == ["replicated", "split"] and f["factors_host_reads"] == 0, (mesh, f["factors_formed"], f["factors_host_reads"])


# ---------------------------------------------------------------------------------------------
# In this process (one CPU device)
# ---------------------------------------------------------------------------------------------


def _synthetic(layout, n: int, seed: int) -> SampleGrads:
    rng = np.random.default_rng(seed)
    paths = sorted({p for b, k in layout.attention_blocks() for p in layout.block_sources(b, k)})
    grads = {p: rng.standard_normal((n, *layout.spec(p).shape)).astype(np.float32) for p in paths}
    return SampleGrads.from_grads(grads, rng.integers(3, 9, size=n), np.arange(100 * seed, 100 * seed + n))


@pytest.fixture(scope="module")
def tiny():
    layout = abstract_layout(tiny_config("gpt2"))
    return layout, _synthetic(layout, 5, 1), _synthetic(layout, 4, 2), _synthetic(layout, 3, 3)


@pytest.mark.parametrize("bad", ["names", "order", "string", "devices"])
def test_a_bad_mesh_is_a_config_error(tiny, bad):
    layout, a, b, held = tiny
    device = np.array(jax.devices()[:1])
    mesh = {"names": lambda: Mesh(device, ("batch",)), "order": lambda: Mesh(device.reshape(1, 1), ("model", "data")),
            "string": lambda: "data", "devices": lambda: list(jax.devices())}[bad]()
    with pytest.raises(ConfigError, match="mesh"):
        qkov.heatmap(a, b, layout, mesh=mesh, min_fisher_samples=3)
    with pytest.raises(ConfigError, match="mesh"):
        qkov.permutation_test(a, b, held, layout, mesh=mesh, min_fisher_samples=3)
    with pytest.raises(ConfigError, match="mesh"):
        conflicts.detect(a, b, layout=layout, mesh=mesh)
    with pytest.raises(ConfigError, match="mesh"):
        conflicts.pairwise_cosines(a, b, layout=layout, mesh=mesh)


def test_a_one_device_mesh_equals_no_mesh(tiny):
    """The sharded code path on the one device this process has: same numbers, scores kept."""
    layout, a, b, _ = tiny
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    want = qkov.heatmap(a, b, layout, min_fisher_samples=3)
    kept = qkov.heatmap(a, b, layout, min_fisher_samples=3, mesh=mesh, gather_scores=False)
    assert isinstance(kept.scores, qkov.ShardedScores) and kept.scores.shape == want.scores.shape
    np.testing.assert_allclose(np.asarray(kept.scores), want.scores, rtol=TOLERANCE, atol=1e-6 * np.abs(want.scores).max())
    np.testing.assert_allclose(kept.layer_head_avg, want.layer_head_avg, rtol=TOLERANCE)
    gram, gram_mesh = conflicts.pairwise_cosines(a, b, layout=layout), conflicts.pairwise_cosines(a, b, layout=layout, mesh=mesh)
    np.testing.assert_allclose(gram_mesh.cosines, gram.cosines, rtol=TOLERANCE, atol=1e-6)
    np.testing.assert_allclose(gram_mesh.group_dots, gram.group_dots, rtol=TOLERANCE, atol=1e-6 * np.abs(gram.group_dots).max())
