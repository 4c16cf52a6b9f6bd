"""``fisherjax plan``: compiled step memory, the micro-batch and mesh search, derived storage and
work figures, and the command line (tiny configs written as config.json files)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from fisherjax.analysis import qkov
from fisherjax.analysis.conflicts import ConflictOptions
from fisherjax.cli import main
from fisherjax.errors import ConfigError
from fisherjax.fisher.step import lower_step
from fisherjax.layout import flatten
from fisherjax.models.model import Model
from fisherjax.fisher.options import kept_paths
from fisherjax.plan import (
    GB, conflict_bytes_read, conflict_sample_reads, conflict_slices, curvature_plan, default_options, format_plan,
    kept_parameters, plan, qkov_sample_reads, read_config, step_memory,
)
from fisherjax.fisher.step import largest_fitting
from fisherjax.curvature.lanczos import default_steps as lanczos_steps
from fisherjax.work import COLLECT_FORWARDS, curvature_flops, forward_flops, heads_flops, masks_flops, qkov_pair_reads
from conftest import FAST_FAMILIES

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
}
WIDE = {**TINY, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 8, "num_key_value_heads": 4, "vocab_size": 16}
"""Parameters dominate its step at T = 4, so sharding them over a "model" axis helps."""
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4,
        "n_positions": 64, "vocab_size": 97}
SEQ = 512
W = 2
"""Bytes per kept number: analyze's default storage, bfloat16, which the plan takes unless told."""
FIELDS = ("argument", "output", "temp", "alias", "generated_code")


def _write(folder, raw):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder / "config.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return read_config(config_file=_write(tmp_path_factory.mktemp("tiny"), TINY))


@pytest.fixture(scope="module")
def base(tiny):
    """Every candidate up to the 4 samples fits 80 GB: micro-batches 1, 2 and 4 are compiled."""
    return plan(tiny, samples=4, seq_len=SEQ, devices=1, device_memory_gb=80)


def test_the_step_memory_is_the_compiled_memory_analysis(tiny, base):
    assert [c.micro_batch for c in base.candidates] == [1, 2, 4] and base.micro_batch == 4 and base.step == base.candidates[-1]
    model = Model.abstract(tiny)
    for step in (base.candidates[0], base.step):  # micro-batch 1 and the chosen one (4)
        analysis = lower_step(model, step.micro_batch, SEQ, base.options).compile().memory_analysis()
        got = [getattr(step, f"{f}_bytes") for f in FIELDS]
        assert got == [int(getattr(analysis, f"{f}_size_in_bytes")) for f in FIELDS]
        assert step.total_bytes == step.argument_bytes + step.output_bytes + step.temp_bytes + step.generated_code_bytes - step.alias_bytes
    assert base.per_device_bytes == base.step.total_bytes and not base.model_axis_estimate and base.mesh == (1, 1)
    assert base.options.keep_sample_grads is True and base.options.sample_loop is False


def test_the_largest_micro_batch_that_fits_is_chosen(tiny, base):
    totals = {c.micro_batch: c.total_bytes for c in base.candidates}
    assert totals[1] < totals[2] < totals[4]
    between = (totals[2] + totals[4]) / 2
    misses = step_memory.cache_info().misses
    p = plan(tiny, samples=4, seq_len=SEQ, device_memory_gb=between / GB, safety=1.0)
    assert p.micro_batch == 2 and p.step.total_bytes == totals[2] and [c.micro_batch for c in p.candidates] == [1, 2, 4]
    assert step_memory.cache_info().misses == misses  # the steps base compiled: not compiled again
    p = plan(tiny, samples=4, seq_len=SEQ, device_memory_gb=(totals[1] + totals[2]) / 2 / GB, safety=1.0)
    assert p.micro_batch == 1 and [c.micro_batch for c in p.candidates] == [1, 2]  # the search stops at the first misfit


def test_a_small_device_gets_a_model_axis_or_a_clear_error(tmp_path):
    config = read_config(model_dir=_write(tmp_path / "wide", WIDE).parent)
    fits = plan(config, samples=4, seq_len=4, devices=4, device_memory_gb=1)
    step = fits.candidates[0]
    leaves = {p: math.prod(x.shape) * 4 for p, x in flatten(Model.abstract(config).params).items()}
    layer = sum(b for p, b in leaves.items() if p.startswith("layers/")) / config.num_layers
    outside = max(b for p, b in leaves.items() if not p.startswith("layers/"))
    derived = {m: step.total_bytes - sum(leaves.values()) * (1 - 1 / m) + layer + outside for m in (2, 4)}
    assert derived[4] < derived[2] < step.total_bytes

    p = plan(config, samples=4, seq_len=4, devices=4, device_memory_gb=(derived[2] + step.total_bytes) / 2 / GB, safety=1.0)
    assert p.mesh == (2, 2) and p.model_axis_estimate and p.micro_batch == 1 and p.global_micro_batch == 2
    assert p.per_device_bytes == pytest.approx(derived[2]) and p.step == step
    assert "DERIVED" in format_plan(p)
    p = plan(config, samples=4, seq_len=4, devices=4, device_memory_gb=(derived[4] + derived[2]) / 2 / GB, safety=1.0)
    assert p.mesh == (1, 4) and p.per_device_bytes == pytest.approx(derived[4])
    with pytest.raises(ConfigError, match=r"nothing fits.*--device-memory"):
        plan(config, samples=4, seq_len=4, devices=4, device_memory_gb=derived[4] / 2 / GB)


def test_storage_and_work_are_the_formulas(tiny, base, tmp_path):
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    q_o = 2 * TINY["hidden_size"] * TINY["num_attention_heads"] * head_dim
    k_v = 2 * TINY["hidden_size"] * TINY["num_key_value_heads"] * head_dim
    kept = TINY["num_hidden_layers"] * (q_o + k_v)
    assert base.kept_parameters == kept and base.stored_values == base.kept_values == kept
    assert base.storage_dtype == "bfloat16" and not base.spill
    assert base.storage_bytes == 4 * 2 * kept * W == base.storage_bytes_per_device == base.storage_bytes_per_host
    n, layout = 4, Model.abstract(tiny).layout
    assert base.phase5_flops == 1 * 3 * 2 * n * n * kept  # one pair of tasks: A × B, A × A, B × B
    held = round(0.5 * n)
    assert base.phase6_flops == 0  # below qkov's min_fisher_samples (8) Phase 6 is skipped, as analyze does
    big = plan(tiny, samples=16, seq_len=SEQ, devices=4, device_memory_gb=80, throughput_tflops=2.0)
    n, held = 16, 8
    # the heatmap, and the permutation test's mean row of the fit half against B and against the held-out half
    assert big.phase6_flops == 2 * (qkov.flops(n, n, layout) + qkov.flops(1, n, layout) + qkov.flops(1, held, layout)) > 0
    assert big.phase6_seconds == big.phase6_flops / (2e12 * 4) and not big.throughput_assumed
    assert not big.phase6_one_pass and "one direction at a time" in format_plan(big)  # a mesh scores each direction alone
    assert "the host holds one direction's" in format_plan(big)
    assert big.storage_bytes_per_device == 4 * 2 * kept * W and big.global_micro_batch == 4 * big.micro_batch

    # Phase 5's reads: by parameter slice (on one device or a mesh) each task once per pair; in
    # chunk pairs, when the slices' dot products do not fit, A once and B once per row chunk of A
    # (data × chunk samples) unless B fits one chunk
    assert base.phase5_chunk is None and base.phase5_bytes_read == 1 * W * kept * 2 * 4
    assert conflict_bytes_read(10, 3, features=5, references=2, dtype="bfloat16", chunk=None) == 3 * 2 * 5 * 2 * 10
    assert big.phase5_chunk is None and big.phase5_bytes_read == 1 * W * kept * 2 * 16
    options = ConflictOptions()
    assert conflict_slices(layout, base.options, 16, options)
    many = math.isqrt(int(options.memory_budget_bytes // (4 * TINY["num_attention_heads"]))) + 1  # one layer's q groups × n² > budget
    assert not conflict_slices(layout, base.options, many, options) and conflict_slices(layout, base.options, many - 1, options)
    assert conflict_bytes_read(10, 3, features=5, references=2, dtype="bfloat16", chunk=2, data=2) == 3 * 3 * 2 * 5 * (10 + 3 * 10)

    gpt2 = read_config(config_file=_write(tmp_path / "gpt2", GPT2))  # fused c_attn: kernel and bias kept, c_proj's bias not
    d = GPT2["n_embd"]
    assert kept_parameters(Model.abstract(gpt2).layout, base.options) == GPT2["n_layer"] * (d * 3 * d + 3 * d + d * d)


def test_kernels_kept_as_token_factors_change_storage_step_and_work(tiny):
    """At T = 4 the tiny model's attention kernels are kept as token factors (analyze's ``auto``
    rule): the plan stores ``L · T · (d_in + d_out)`` numbers per kernel, compiles the step that
    returns factors, and adds the work of forming the gradients wherever Phases 5 and 6 read them."""
    seq, n = 4, 16
    factored = plan(tiny, samples=n, seq_len=seq, device_memory_gb=80, throughput_tflops=1.0)
    grads = plan(tiny, samples=n, seq_len=seq, device_memory_gb=80, throughput_tflops=1.0, sample_grads_form="gradients")
    layout = Model.abstract(tiny).layout
    kernels = [p for p in kept_paths(layout, True) if layout.spec(p).kind == "kernel"]
    assert kernels and set(factored.factored) == set(kernels) == set(factored.options.sample_grads_factors) and grads.factored == ()
    shapes = [layout.spec(p).shape for p in kernels]
    values = sum(L * seq * (d_in + d_out) for L, d_in, d_out in shapes)
    others = factored.kept_parameters - sum(math.prod(s) for s in shapes)  # biases stay gradients
    assert factored.kept_values == values + others < factored.kept_parameters == grads.kept_parameters == grads.kept_values
    assert factored.storage_bytes == n * 2 * factored.kept_values * W and grads.storage_bytes == n * 2 * grads.kept_values * W
    assert factored.step != grads.step  # a different compiled step (factors out, no per-sample kernel gradients)

    reform = sum(L * 2 * seq * d_in * d_out for L, d_in, d_out in shapes)  # one sample's factored kernels formed once
    assert factored.phase5_reform_flops == conflict_sample_reads(n, 2, 2, None) * reform == 2 * n * reform
    # Phase 6 on one device computes a pair's two directions together (qkov.both_ways, which fits
    # here): each task's samples formed once; the test's fit half's Fisher (its mean row) is Phase
    # 1's record (analyze collects that half first), and without the record the half is formed again
    assert qkov.formed_once(n, n, layout)
    assert factored.phase6_one_pass and "both directions of a pair in one pass" in format_plan(factored)
    assert "the fit halves' Fisher recorded by Phase 1" in format_plan(factored)
    assert "the host holds both directions', twice that, and half of one again" in format_plan(factored)
    assert factored.phase6_reform_flops == qkov_sample_reads(n, 2, 8, formed_once=True) * reform == 2 * n * reform
    assert sum(qkov_pair_reads(n, n, 8, formed_once=True, fit_diagonal=False)) == n + 8
    # read by separate heatmaps and tests, every score array forms what it reads: the heatmap A's
    # rows and its partner once per chunk of rows; the test its mean row's partners, B and the
    # held-out half, once (and its fit half once without Phase 1's record of its Fisher)
    assert qkov_sample_reads(n, 2, 8) == 2 * ((n + 8) + 2 * n)
    assert sum(qkov_pair_reads(n, n, 8, fit_diagonal=False)) == (n + 8 + 8) + 2 * n
    assert qkov_sample_reads(n, 2, 8, partner_reads=lambda x, y: 3) == 2 * ((n + 8) + (3 + 1) * n)
    # without Phase 1's full diagonal the heatmap forms A's kept samples once more for their Fisher
    assert qkov_sample_reads(n, 2, 8, diagonal=False) == 2 * ((2 * n + 8 + 8) + 2 * n)
    assert qkov_sample_reads(n, 2, 8, diagonal=False, formed_once=True) == 2 * (2 * n + 8)
    # not even one layer of the shared pass fits: direction by direction
    assert not qkov.formed_once(n, n, layout, kernel=qkov.KernelOptions(memory_budget_bytes=1e3))
    assert factored.phase5_flops - factored.phase5_reform_flops == grads.phase5_flops and grads.phase5_reform_flops == 0
    assert factored.phase6_flops - factored.phase6_reform_flops == grads.phase6_flops and grads.phase6_reform_flops == 0
    assert factored.phase5_bytes_read == 2 * n * factored.kept_values * W
    # Phase 6 reads its slices as stored (kernels as factors, q/k/v biases as gradients) each time it forms them
    biases = sum(math.prod(layout.spec(p).shape) for p in {layout.block_sources(b, k)[0] for b, k in layout.attention_blocks() if k == "bias"})
    assert qkov.ScoreOptions().include_bias
    assert factored.phase6_bytes_read == qkov_sample_reads(n, 2, 8, formed_once=True) * W * (values + biases)
    assert grads.phase6_bytes_read == qkov_sample_reads(n, 2, 8, formed_once=True) * W * (sum(math.prod(s) for s in shapes) + biases)
    assert "token factors" in format_plan(factored) and "token factors" not in format_plan(grads)

    true_fisher = default_options().replace(fisher_type="true")  # keeps C_i beside g_i: never factors
    true_plan = plan(tiny, samples=1, seq_len=seq, device_memory_gb=80, options=true_fisher, sample_grads_form="auto")  # one step compiled
    assert true_plan.factored == () and true_plan.stored_values == 2 * true_plan.kept_values  # g_i and C_i
    assert true_plan.storage_bytes == 1 * 2 * true_plan.stored_values * W and "C_i" in format_plan(true_plan)
    with pytest.raises(ConfigError, match="--sample-grads-form"):
        plan(tiny, samples=4, seq_len=seq, device_memory_gb=80, options=true_fisher, sample_grads_form="factors")
    assert qkov_sample_reads(7, 2, 8) == 0  # below min_fisher_samples Phase 6 is skipped


def test_the_micro_batch_search_measures_few_steps_and_finds_what_trying_each_in_turn_finds():
    candidates = [1, 2, 4, 8, 16, 32, 64]

    def search(memory, limit):
        measured = []
        found = largest_fitting(candidates, lambda c: measured.append(c) or memory(c), limit)
        return found, measured

    def in_turn(memory, limit):  # every candidate in order until one does not fit
        best = None
        for c in candidates:
            if memory(c) > limit:
                break
            best = c
        return best

    line = lambda c: 10.0 + 3.0 * c  # noqa: E731
    assert search(line, 1e9) == (64, [1, 2, 64])  # everything fits: the largest, confirmed
    assert search(line, 14.0) == (1, [1, 2])  # as at 7B: micro-batch 2 does not fit
    assert search(line, 5.0) == (None, [1])
    assert search(line, 10.0 + 3.0 * 20) == (16, [1, 2, 16, 32])  # the predicted one fits, the next does not
    bent = lambda c: 10.0 + 3.0 * c + 0.5 * c * c  # noqa: E731 — grows faster than the line: walks down
    assert search(bent, bent(8))[0] == 8 == in_turn(bent, bent(8))
    rng = np.random.default_rng(0)
    for _ in range(300):  # any memory that grows with the micro-batch: the same answer as in turn
        steps = np.cumsum(rng.exponential(1.0, len(candidates)) * rng.uniform(0, 2, len(candidates)) ** 2)
        memory = dict(zip(candidates, steps)).__getitem__
        limit = float(rng.uniform(0, steps[-1] * 1.1))
        found, measured = search(memory, limit)
        assert found == in_turn(memory, limit) and len(measured) == len(set(measured))


def test_storage_is_analyzes_and_spills_when_the_host_is_small(tiny, base):
    """Unless told, the plan keeps what ``analyze`` keeps (bfloat16), on a large host as on a small
    one; beside it, the line says what float32 (a kfac run's default) would take and whether it fits."""
    float32 = 1 * 2 * base.kept_parameters * 4  # one sample per task, on one host
    p = plan(tiny, samples=1, seq_len=SEQ, device_memory_gb=80, host_memory_gb=float32 * 0.75 / 0.9 / GB)
    assert p.storage_dtype == "bfloat16" and not p.spill and p.storage_bytes == float32 / 2 and not p.storage_given
    assert p.options.sample_grads_dtype == "bfloat16" and [c.micro_batch for c in p.candidates] == [1]
    assert p.float32_bytes_per_host == float32
    line = next(row for row in format_plan(p).splitlines() if row.startswith("storage "))
    assert "bfloat16 (analyze's default); fits host memory" in line
    beside = line.split("; float32 (--sample-grads-dtype float32, kept by default with --qkov-variant signed or kfac): ")[1]
    assert beside.split(" per host, ")[1].startswith("spill to disk (--spill-dir)")
    roomy = plan(tiny, samples=1, seq_len=SEQ, device_memory_gb=80, host_memory_gb=float32 * 4 / GB)
    assert roomy.storage_dtype == "bfloat16" and not roomy.spill
    given = plan(tiny, samples=1, seq_len=SEQ, device_memory_gb=80, host_memory_gb=float32 * 0.75 / 0.9 / GB, storage_dtype="float32")
    assert given.storage_dtype == given.options.sample_grads_dtype == "float32" and given.storage_given and given.spill
    assert given.storage_bytes == float32 and "float32 (as given); spill to disk" in format_plan(given)
    p = plan(tiny, samples=1, seq_len=SEQ, device_memory_gb=80, host_memory_gb=float32 * 0.25 / 0.9 / GB)
    assert p.storage_dtype == "bfloat16" and p.spill
    assert "bfloat16 (analyze's default); spill to disk" in format_plan(p)


def test_conflict_tests_per_group_where_the_host_holds_them(tiny, base):
    """The plan's Phase 5 says what a pair's per-group tests hold on the host and which scope
    ``--conflict-scope auto`` takes with the host's memory (half of it for those tests)."""
    from fisherjax.analysis.conflicts import GROUP_TEST_CORE_SECONDS, GROUP_TEST_CORE_SECONDS_INDEPENDENT, group_scope_bytes
    from fisherjax.pipeline import conflict_groups, conflict_open_groups

    layout = Model.abstract(tiny).layout
    n, groups, held = 4, conflict_groups(layout), conflict_open_groups(layout, 4, 4)
    assert 0 < held <= groups  # the within-task Grams stream into their nulls: only the groups read in part are held
    assert base.phase5_group_bytes == group_scope_bytes(n, n, groups, open_groups=held) > 0 and base.phase5_scope == "groups"
    assert "tested per head group" in format_plan(base) and "(with 10% of their tests kept: p ≤ alpha)" in format_plan(base)
    # the host tests' time: every pair's tested values at the measured core-seconds each (one pair of two tasks here)
    assert base.phase5_test_values == groups * 3 * n * n
    assert base.phase5_test_core_seconds == pytest.approx(GROUP_TEST_CORE_SECONDS * groups * 3 * n * n * math.log2(groups * n * n))
    # ... where every test conflicts (all kept); tasks that do not conflict take the lower measured rate
    assert base.phase5_test_core_seconds_independent == pytest.approx(
        GROUP_TEST_CORE_SECONDS_INDEPENDENT * groups * 3 * n * n * math.log2(groups * n * n))
    assert GROUP_TEST_CORE_SECONDS_INDEPENDENT < GROUP_TEST_CORE_SECONDS
    assert "(tasks that do not conflict) to" in format_plan(base) and "(conflicting in every test) of one core's time" in format_plan(base)
    assert f"host tests of {groups * 3 * n * n / 1e3:.1f} k values" in format_plan(base)
    three = plan(tiny, samples=n, seq_len=SEQ, device_memory_gb=80, tasks=3)
    assert three.phase5_test_values == 3 * base.phase5_test_values and three.phase5_test_core_seconds == 3 * base.phase5_test_core_seconds
    # Phase 6's scores: [block, layer, n_a, n_b, heads] float32 per ordered pair, all of them in qkov.npz
    layout = Model.abstract(tiny).layout
    assert base.phase6_scores_bytes == 4 * 4 * layout.num_layers * n * n * layout.num_heads
    assert base.phase6_output_bytes == 0.0 and "in qkov.npz" in format_plan(base)  # 4 samples: below the Fisher's minimum, no heatmap
    eight = plan(tiny, samples=8, seq_len=SEQ, device_memory_gb=80, tasks=3)
    assert eight.phase6_output_bytes == 6 * eight.phase6_scores_bytes == 6 * 4 * base.phase6_scores_bytes
    small = plan(tiny, samples=n, seq_len=SEQ, device_memory_gb=80, host_memory_gb=1.9 * base.phase5_group_bytes / GB)
    assert small.phase5_scope == "overall" and "tested on the whole gradient (--conflict-scope auto" in format_plan(small)
    assert small.phase5_test_values == 3 * n * n  # one group: the whole gradient


@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_forward_flops_are_torchs_count_of_the_hf_forward(hf_checkpoint, kind):
    """The plan's forward FLOPs equal torch's own count (``FlopCounterMode``: 2 per multiply-add of
    every matrix product) of the Hugging Face model's eager forward pass, on every family."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    directory, model = hf_checkpoint(kind)
    seq = 24
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.arange(3, 3 + seq)[None] % model.config.vocab_size)
    counted = forward_flops(Model.abstract(read_config(model_dir=directory)).layout, seq)
    assert counted.total == counter.get_total_flops() and min(counted.layers, counted.attention, counted.unembedding) > 0


def test_work_over_batches_and_without_ablations(tiny):
    """``work.batches_flops`` counts every row of each batch at the batch's own length; the heads
    phase without ablated heads runs no plain pass (the head-mask gradients only: 2F)."""
    from types import SimpleNamespace

    from fisherjax.work import batches_flops

    layout = Model.abstract(tiny).layout
    batches = [SimpleNamespace(input_ids=np.zeros((8, 32), np.int32)), SimpleNamespace(input_ids=np.zeros((3, 64), np.int32))]
    assert batches_flops(layout, batches, lambda f: f.total) == 8 * forward_flops(layout, 32).total + 3 * forward_flops(layout, 64).total
    f = forward_flops(layout, 16)
    assert heads_flops(f, layout, 2, 5, 0) == 2 * 5 * 2 * f.total
    assert heads_flops(f, layout, 1, 1, 1) == 3 * f.total + (f.layers + f.attention) / 2 + f.unembedding
    # where analyze knows the ablated heads' layers, each resumes from its own: a first-layer head costs every block
    L = layout.num_layers
    assert heads_flops(f, layout, 1, 1, 99, layers=[0, 0, L - 1]) == pytest.approx(
        3 * f.total + (2 + 1 / L) * (f.layers + f.attention) + 3 * f.unembedding)
    assert heads_flops(f, layout, 1, 1, 2, layers=[0, L - 1]) > heads_flops(f, layout, 1, 1, 2)  # (L + 1) / L blocks, not 1


def test_every_phase_has_its_work_and_the_comparison_its_rule(tiny, base, monkeypatch):
    """Phase 1, the heads and masks phases and the method comparison: the formulas at analyze's
    defaults, their time at the throughput (Phase 1 over the devices, the others on one), the
    total, and the comparison's memory rule (pipeline.curvature_skip) on one device."""
    from fisherjax import pipeline
    from fisherjax import plan as planning
    from fisherjax.curvature import compare, lowrank
    from fisherjax.heads import CATEGORIES
    from fisherjax.pipeline import AnalysisConfig

    n, tasks, model = 4, 2, Model.abstract(tiny)
    layout, defaults = model.layout, AnalysisConfig()
    f = forward_flops(layout, SEQ)
    assert base.forward == f and base.phase1_flops == COLLECT_FORWARDS * f.total * n * tasks
    heads = layout.num_layers * layout.num_heads  # the tiny model has fewer heads than --ablation-heads asks for
    assert base.heads_flops == heads_flops(f, layout, tasks, n, defaults.ablation_heads) == tasks * n * (
        3 * f.total + heads * ((f.layers + f.attention) / 2 + f.unembedding))
    assert base.masks == tasks + 10 + len(CATEGORIES) + 1 and base.masks_flops == masks_flops(f, tasks, n, base.masks)
    c = base.curvature
    assert c.samples == n and c.k == defaults.curvature_k and c.gram  # 4 samples < k: the Gram's 4 and zeros, exact
    assert c.flops == curvature_flops(f, n, model.num_params, c.k) > 0
    assert c.peak_bytes == compare.peak_bytes(model, c.k, n=n, sample_grads_dtype=base.storage_dtype, tokens=n * SEQ, seq_len=SEQ)
    # a pass's working memory counts what XLA says a sample's backward keeps, here more than the logits
    one = lowrank.pass_temporaries(model, 1, SEQ)
    assert compare.working_bytes(model, n * SEQ, SEQ) == math.ceil(compare.WORKING_MARGIN * n * one) > compare.working_bytes(model, n * SEQ)
    assert c.free_bytes == 0.9 * 80 * GB - model.parameter_bytes and c.skip is None and c.forced_skip is None
    assert (c.fit_samples, c.fit_k) == (n, c.k)
    rate = base.throughput_tflops * 1e12
    assert base.phase1_seconds == base.phase1_flops / rate and base.heads_seconds == base.heads_flops / rate
    assert base.total_seconds == pytest.approx(base.phase1_seconds + c.seconds + base.heads_seconds + base.masks_seconds
                                               + base.phase5_seconds + base.phase6_seconds)
    text = format_plan(base)
    for line in ("Phase 1 (collect)", "method comparison         runs: 4 samples, top 10 from their Gram", "heads phase", "masks phase",
                 "total"):
        assert line in text, line

    # more samples than twice Lanczos's steps: its products, its basis whole (least = peak)
    one, many = dataclasses.replace(defaults, curvature_k=1), 2 * lanczos_steps(model.num_params, 1) + 1
    products = curvature_plan(model, f, many, c.free_bytes, rate, "float32", one, SEQ)
    assert not products.gram and products.least_bytes == products.peak_bytes and products.samples == many
    assert "top 1 by Lanczos" in format_plan(dataclasses.replace(base, curvature=products))
    # a device that cannot hold Lanczos's basis: the most samples whose Gram route fits (2 · steps) run with --curvature
    fewer = compare.least_bytes(model, 1, n=many - 1, sample_grads_dtype="float32", tokens=min(defaults.batch_size, many) * SEQ,
                                sample_tokens=SEQ)
    small = curvature_plan(model, f, many, (fewer + products.least_bytes) / 2, rate, "float32", one, SEQ)
    assert small.skip == small.forced_skip == "memory" and (small.fit_samples, small.fit_k) == (many - 1, 1)
    assert f"--curvature-samples {many - 1} fits with --curvature" in format_plan(dataclasses.replace(base, curvature=small))
    assert "method comparison         skipped: it does not fit" in format_plan(dataclasses.replace(base, curvature=small))

    # a device between the rest of the peak and the peak: skipped (G̃ whole does not fit); with --curvature
    # the Gram route fits, its gradients in column slices
    rest, per_sample = c.stream_bytes, compare.basis_bytes(model.num_params, 2, n=2, sample_grads_dtype="float32") / 2
    assert rest == compare.stream_bytes(model) + compare.working_bytes(model, SEQ, SEQ) and c.least_bytes < c.peak_bytes
    rest = compare.rest_bytes(model, SEQ, SEQ)  # K-FAC and the vectors whole beside a sample's pass
    gram_config = dataclasses.replace(defaults, curvature_k=2)
    sliced = curvature_plan(model, f, n, rest + 2.5 * per_sample, rate, "float32", gram_config, seq_len=SEQ)
    assert sliced.gram and sliced.skip == "share" and sliced.forced_skip is None
    assert sliced.least_bytes < sliced.free_bytes < sliced.peak_bytes
    assert sliced.slices == len(compare.gram_slices(model, n, "float32", sliced.free_bytes, n * SEQ, SEQ)) >= 1 and c.slices == 0
    parts = compare.stage_plan(model, sliced.free_bytes, n, SEQ)[1]
    assert sliced.groups == len(parts) >= 1
    assert sliced.flops == curvature_flops(f, n, model.num_params, 2, slices=sliced.slices, groups=sliced.groups,
                                           factor_passes=sum(len(g.ranges) or 1 for g in parts)) > curvature_flops(f, n, model.num_params, 2)
    assert "with --curvature it runs: 4 samples, top 2 from their Gram, peak" in format_plan(dataclasses.replace(base, curvature=sliced))
    assert (f"so their Gram in {sliced.slices} column slice{'s' * (sliced.slices > 1)} of the gradients (a gradient pass each) and K-FAC's "
            f"stage by {sliced.groups} group") in format_plan(dataclasses.replace(base, curvature=sliced))
    shared = curvature_plan(model, f, n, 1.5 * c.peak_bytes, rate, "float32", None, SEQ)  # fits, but more than half of it
    assert shared.skip == "share" and shared.forced_skip is None
    assert "skipped by default (its peak is more than 50% of the free memory); with --curvature it runs: 4 samples" in format_plan(
        dataclasses.replace(base, curvature=shared))
    monkeypatch.setattr(pipeline, "CURVATURE_AUTO_PARAMETERS", 10)
    monkeypatch.setattr(planning, "CURVATURE_AUTO_PARAMETERS", 10)
    large = curvature_plan(model, f, n, c.free_bytes, rate, "float32", None, SEQ)
    assert large.skip == "parameters" and large.forced_skip is None
    assert "skipped by default (" in format_plan(dataclasses.replace(base, curvature=large)) and "with --curvature it runs: 4 samples" in (
        format_plan(dataclasses.replace(base, curvature=large)))
    nothing = curvature_plan(model, f, n, 0.5 * c.stream_bytes, rate, "float32", None, SEQ)
    assert (nothing.fit_samples, nothing.fit_k) == (0, 0)
    text = format_plan(dataclasses.replace(base, curvature=nothing))
    assert "with any number of samples: K-FAC's stage alone takes" in text


@pytest.mark.parametrize("changes, flag", [
    (dict(samples=0), "--samples"), (dict(devices=0), "--devices"), (dict(device_memory_gb=0.0), "--device-memory"),
    (dict(device_memory_gb=-1.0), "--device-memory"), (dict(seq_len=513), "--seq-len"), (dict(tasks=0), "--tasks"),
    (dict(host_memory_gb=float("nan")), "--host-memory"), (dict(throughput_tflops=0.0), "--tflops"),
])
def test_bad_options_name_their_flag(tiny, changes, flag):
    with pytest.raises(ConfigError, match=flag):
        plan(tiny, **{"samples": 4, "seq_len": SEQ, **changes})


@pytest.mark.slow
def test_cli_re_runs_itself_on_forced_host_devices(tmp_path, capfd):
    """On a CPU with fewer devices than planned the command re-runs itself with forced host devices
    and compiles the sharded step on the mesh (its output is the child's: capfd)."""
    file = _write(tmp_path / "tiny", TINY)
    assert main(["plan", "--config", str(file), "--samples", "8", "--devices", "4", "--device-memory", "1", "--json"]) == 0
    out = json.loads(capfd.readouterr().out)
    assert out["mesh"] == [4, 1] and out["sharded_step"] is True


def test_cli_prints_json(tmp_path, capfd):
    """(On four devices a CPU re-runs the command on forced host devices: the slow test above, and
    tests/sharded_collect_check.py for the plan on a mesh.)"""
    file = _write(tmp_path / "tiny", TINY)
    assert main(["plan", "--config", str(file), "--samples", "8", "--devices", "1", "--device-memory", "1", "--json"]) == 0
    out = json.loads(capfd.readouterr().out)
    assert out["mesh"] == [1, 1] and out["micro_batch"] == 8 and out["global_micro_batch"] == 8
    assert out["step"]["total_bytes"] <= 0.9e9 and out["model_axis_estimate"] is False and out["throughput_assumed"] is True
    assert out["sharded_step"] is False
    assert main(["plan", "--model", str(file.parent), "--samples", "8", "--devices", "1", "--device-memory", "1"]) == 0
    text = capfd.readouterr().out
    assert "recommended mesh" in text and "micro-batch" in text and "kept gradients" in text
    assert "bfloat16 (analyze's default)" in text
    for flag in ("--sample-grads-dtype", "--storage-dtype"):  # analyze's name, and the plan's older one
        args = ["--config", str(file), "--samples", "8", "--devices", "1", "--device-memory", "1", flag, "float32", "--json"]
        assert main(["plan", *args]) == 0
        out = json.loads(capfd.readouterr().out)
        assert out["storage_dtype"] == "float32" and out["storage_given"] is True
    # without --seq-len a model with fewer than 512 positions is planned at all of them (it was refused)
    small = _write(tmp_path / "gpt2", GPT2)
    assert main(["plan", "--config", str(small), "--samples", "2", "--devices", "1", "--device-memory", "1", "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["seq_len"] == GPT2["n_positions"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "config.json", "gpt2", "tiny"]  # plan writes nothing


@pytest.mark.parametrize("case", ["missing file", "missing dir", "not json", "bad field", "samples"])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, case):
    file = tmp_path / "config.json"
    args = ["--config", str(file), "--samples", "8"]
    if case == "missing dir":
        args[:2] = ["--model", str(tmp_path / "nowhere")]
    elif case == "not json":
        file.write_text("{not json")
    elif case == "bad field":
        file.write_text(json.dumps({**TINY, "num_hidden_layers": 0}))
    elif case == "samples":
        file.write_text(json.dumps(TINY))
        args[-1] = "0"
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fisherjax: error:")
    assert ("--samples" if case == "samples" else str(tmp_path / "nowhere") if case == "missing dir" else str(file)) in err


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_the_temporaries_bound_is_above_what_xla_says(family, monkeypatch):
    """``lowrank.temporaries_bound`` is at least XLA's temporaries of a sample's gradient pass
    (``lowrank.pass_temporaries``), short and long, and a comparison that fits at the bound is
    held whole without a pass compiled to measure it."""
    from conftest import tiny_config
    from fisherjax.curvature import compare, lowrank

    model = Model.abstract(tiny_config(family, vocab_size=300, max_position_embeddings=128))
    for seq in (16, 128):
        assert lowrank.pass_temporaries(model, 1, seq) <= lowrank.temporaries_bound(model, 1, seq)
    other = Model.abstract(tiny_config(family, vocab_size=301, max_position_embeddings=128))  # nothing measured for it yet
    measured, original = [], lowrank.pass_temporaries
    monkeypatch.setattr(lowrank, "pass_temporaries", lambda *args: measured.append(args) or original(*args))
    bound = compare.peak_bytes(other, 4, n=8, tokens=8 * 64, seq_len=64, bound=True)
    assert not measured and bound >= compare.peak_bytes(other, 4, n=8, tokens=8 * 64, seq_len=64)
    measured.clear()
    assert compare.gram_slices(other, 8, "float32", bound, 8 * 64, 64) is None and not measured  # fits at the bound
    assert compare.gram_slices(other, 8, "float32", bound - 1, 8 * 64, 64) is None and measured  # measured, and fits
