"""Head-mask importance and single-head ablation against Hugging Face's PyTorch models in float64.

HF computes the attention softmax and RMSNorm in float32 whatever the model's dtype; finite
differences would amplify that rounding (1e-7 / ε), so the reference runs them in float64 too (the
softmax's ``dtype=float32`` dropped for float64 inputs, RMSNorm recomputed by a forward hook from its
formula). The reference gates each head with a forward pre-hook on the O projection (GPT-2 ``c_proj``,
Llama ``o_proj``, NeoX ``dense``) that multiplies head ``h``'s slice of its input by ``ξ[l, h]``:
``∂ℓ_i/∂ξ`` by central differences, ablation by ``ξ = 0``. fisherjax sees the same samples
left-padded, in batches with filler rows, and one sample without predicted tokens.
"""

from __future__ import annotations

import copy
import warnings
from typing import NamedTuple
from unittest import mock

import numpy as np
import pytest

from conftest import FAST_FAMILIES, VOCAB, compilations

torch = pytest.importorskip("torch")

import fisherjax  # noqa: E402
from fisherjax.data import batches, task_from_tokens  # noqa: E402
from fisherjax.grads import backward_bytes  # noqa: E402
from fisherjax.heads.ablation import ablate_heads  # noqa: E402
from fisherjax.heads.importance import head_mask_grads, head_mask_importance, rank_correlation  # noqa: E402

EPS = 1e-4
GREEDY = 5  # completion tokens generated greedily (exact at ξ = 1) for half the samples


def o_projections(kind, model):
    if kind == "gpt2":
        return [block.attn.c_proj for block in model.transformer.h]
    if kind == "gpt_neox":
        return [layer.attention.dense for layer in model.gpt_neox.layers]
    return [layer.self_attn.o_proj for layer in model.model.layers]


_SOFTMAX = torch.nn.functional.softmax


def _softmax_keeping_float64(x, *args, dtype=None, **kwargs):
    return _SOFTMAX(x, *args, dtype=None if x.dtype == torch.float64 else dtype, **kwargs)


def _rms_norm_in_float64(module, args, output):
    x = args[0]
    return module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)


class GatedTorch:
    """HF's model in float64 with a gate ``xi [layer, head]`` on every head's output."""

    def __init__(self, kind, torch_model):
        self.model = copy.deepcopy(torch_model).double().eval()
        cfg = self.model.config
        self.heads = cfg.num_attention_heads if kind != "gpt2" else cfg.n_head
        self.modules = o_projections(kind, self.model)
        self.xi = torch.ones(len(self.modules), self.heads, dtype=torch.float64)
        for layer, module in enumerate(self.modules):
            module.register_forward_pre_hook(self._hook(layer))
        for module in self.model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.register_forward_hook(_rms_norm_in_float64)

    def _hook(self, layer):
        def hook(module, args):
            x = args[0]
            gate = self.xi[layer].repeat_interleave(x.shape[-1] // self.heads)
            return (x * gate,) + tuple(args[1:])

        return hook

    @torch.no_grad()
    def logits(self, ids, mask=None):
        """``mask`` marks the real tokens (all of them when None). It is not ``ids != 0``: a greedy
        completion may produce the pad token's id."""
        mask = np.ones_like(ids) if mask is None else mask
        with mock.patch.object(torch.nn.functional, "softmax", _softmax_keeping_float64):
            ids = torch.tensor(ids, dtype=torch.long)
            return self.model(ids, attention_mask=torch.tensor(mask, dtype=torch.long)).logits

    def scores(self, padded):
        """Per sample: ``L_i``, ``T_i``, exact match (right padding, labels shifted by one)."""
        logits = self.logits(padded.ids, padded.mask)[:, :-1]
        target = torch.tensor(padded.labels[:, 1:], dtype=torch.long)
        valid = target != -100
        nll = -torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        hits = (logits.argmax(-1) == target) | ~valid
        tokens = valid.sum(-1)
        return (nll * valid).sum(-1).numpy(), tokens.numpy(), (hits.all(-1) & (tokens > 0)).numpy()

    def greedy(self, prompts, steps):
        """Prompts of one length continued by ``steps`` argmax tokens each."""
        seqs = np.asarray(prompts)
        for _ in range(steps):
            seqs = np.concatenate([seqs, self.logits(seqs)[:, -1].argmax(-1).numpy()[:, None]], axis=1)
        return seqs.tolist()


def _samples(gated, seed=0):
    """Token lists and prompt lengths: four greedy completions of 5-token prompts, three random
    completions of 3- to 7-token prompts, the middle one without predicted tokens."""
    rng = np.random.default_rng(seed)
    greedy = gated.greedy(rng.integers(3, VOCAB, size=(4, 5)), GREEDY)
    tokens, prompts = [], []
    for i in range(7):
        if i % 2 == 0:
            tokens.append(greedy[i // 2])
            prompts.append(5)
        else:
            prompts.append(int(rng.integers(3, 8)))
            tokens.append(rng.integers(3, VOCAB, size=prompts[-1] + GREEDY).tolist())
    prompts[3] = len(tokens[3])  # nothing predicted: T = 0, excluded from the importance
    return tokens, prompts


class Padded(NamedTuple):
    ids: np.ndarray  # [n, seq], 0 after each sample's tokens
    mask: np.ndarray  # [n, seq], 1 on the sample's tokens
    labels: np.ndarray  # [n, seq], -100 on the prompt and the padding


def _right_padded(tokens, prompts) -> Padded:
    seq = max(map(len, tokens))
    ids = np.zeros((len(tokens), seq), np.int64)
    labels = np.full((len(tokens), seq), -100, np.int64)
    for i, (t, p) in enumerate(zip(tokens, prompts)):
        ids[i, : len(t)] = t
        labels[i, max(p, 1) : len(t)] = t[max(p, 1) :]
    mask = (np.arange(seq) < np.array([len(t) for t in tokens])[:, None]).astype(np.int64)
    return Padded(ids, mask, labels)


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    """Per family: (model, task, GatedTorch, the samples right-padded)."""
    cache = {}

    def make(kind):
        if kind not in cache:
            directory, torch_model = hf_checkpoint(kind)
            gated = GatedTorch(kind, torch_model)
            tokens, prompts = _samples(gated)
            task = task_from_tokens("t", tokens, prompt_lens=prompts)
            cache[kind] = (fisherjax.load_pretrained(directory), task, gated, _right_padded(tokens, prompts))
        return cache[kind]

    return make


def _finite_differences(gated, padded):
    """``[n, layer, head]`` central differences of ``ℓ_i = L_i / T_i`` in each ``ξ[l, h]``."""
    layers, heads = gated.xi.shape
    _, tokens, _ = gated.scores(padded)
    out = np.zeros((padded.ids.shape[0], layers, heads))
    for layer in range(layers):
        for head in range(heads):
            sides = []
            for sign in (1, -1):
                gated.xi[layer, head] = 1 + sign * EPS
                sides.append(gated.scores(padded)[0])
            gated.xi[layer, head] = 1.0
            out[:, layer, head] = (sides[0] - sides[1]) / (2 * EPS) / np.maximum(tokens, 1)
    return out, tokens


def _rel(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_head_mask_gradients_equal_finite_differences(kind, reference):
    model, task, gated, padded = reference(kind)
    ref, tokens = _finite_differences(gated, padded)
    counted = np.flatnonzero(tokens > 0)
    assert 3 not in counted

    ours = np.zeros_like(ref)
    for batch in batches(task, 4, side="left"):  # two batches, the second with a filler row
        grads, t = head_mask_grads(model, model.params, batch.input_ids, batch.attention_mask, batch.labels)
        real = batch.sample_ids >= 0
        ours[batch.sample_ids[real]] = np.asarray(grads)[real]
        np.testing.assert_array_equal(np.asarray(t)[real], tokens[batch.sample_ids[real]])
    assert _rel(ours, ref) < 1e-4
    assert np.all(ours[3] == 0)

    importance = head_mask_importance(model, model.params, batches(task, 4, side="left"))
    assert importance.n_samples == len(counted)
    np.testing.assert_array_equal(np.sort(importance.sample_ids), counted)
    assert importance.mean_abs.shape == importance.mean.shape == gated.xi.shape
    assert _rel(importance.mean_abs, np.abs(ref[counted]).mean(0)) < 1e-4
    assert _rel(importance.mean, ref[counted].mean(0)) < 1e-4

    # a budget of 3 rows a pass: each batch of 4 as 2 + 2, the same numbers
    seq = next(batches(task, 4, side="left")).input_ids.shape[1]
    with mock.patch("fisherjax.heads.importance.head_mask_grads", wraps=head_mask_grads) as passes:
        split = head_mask_importance(model, model.params, batches(task, 4, side="left"),
                                     memory_budget_bytes=backward_bytes(model.config, 3, seq))
    assert [c.args[2].shape[0] for c in passes.call_args_list] == [2, 2, 2, 2]
    np.testing.assert_array_equal(split.sample_ids, importance.sample_ids)
    np.testing.assert_allclose(split.mean_abs, importance.mean_abs, rtol=1e-5)
    np.testing.assert_allclose(split.mean, importance.mean, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", FAST_FAMILIES)
def test_single_head_ablation_equals_zero_gate(kind, reference):
    model, task, gated, padded = reference(kind)
    layers, heads = gated.xi.shape

    def task_scores():
        nll, tokens, exact = gated.scores(padded)
        return nll.sum() / tokens.sum(), exact.mean()

    base_loss, base_accuracy = task_scores()
    loss, accuracy = np.zeros((layers, heads)), np.zeros((layers, heads))
    for layer in range(layers):
        for head in range(heads):
            gated.xi[layer, head] = 0.0
            loss[layer, head], accuracy[layer, head] = task_scores()
            gated.xi[layer, head] = 1.0
    assert base_accuracy == pytest.approx(4 / 7)  # the greedy samples; the test can see a change
    assert (accuracy < base_accuracy).any()

    result = ablate_heads(model, model.params, batches(task, 4, side="left"))
    assert result.n_samples == 7
    assert result.baseline_loss == pytest.approx(base_loss, rel=1e-4)
    assert result.baseline_accuracy == base_accuracy
    np.testing.assert_allclose(result.loss, loss, rtol=1e-4)
    np.testing.assert_array_equal(result.accuracy, accuracy)

    with compilations() as c:  # one compiled function per batch shape; the memory knob changes nothing
        again = ablate_heads(model, model.params, batches(task, 4, side="left"))
    assert c.count == 0
    np.testing.assert_array_equal(again.loss, result.loss)
    if kind != "llama":
        return
    chunked = ablate_heads(model, model.params, batches(task, 4, side="left"), heads_per_pass=3)
    np.testing.assert_allclose(chunked.loss, result.loss, rtol=1e-6)
    np.testing.assert_array_equal(chunked.accuracy, result.accuracy)
    some = np.zeros((layers, heads), bool)
    some[0, 1] = some[1, 3] = True  # only these two heads: the same numbers there, NaN elsewhere
    chosen = ablate_heads(model, model.params, batches(task, 4, side="left"), heads=some)
    np.testing.assert_allclose(chosen.loss[some], result.loss[some], rtol=1e-6)
    np.testing.assert_array_equal(chosen.accuracy[some], result.accuracy[some])
    assert np.isnan(chosen.loss[~some]).all() and np.isnan(chosen.accuracy[~some]).all()
    assert chosen.baseline_loss == pytest.approx(result.baseline_loss, rel=1e-6)


def test_rank_correlation():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert rank_correlation(a, np.array([[1.0, 3.0], [2.0, 4.0]])) == pytest.approx(0.8)  # 1 − 6·Σd²/(n(n²−1))
    assert rank_correlation(a, np.exp(a)) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    # ties take average ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4) → Pearson of the ranks
    x, y = np.array([1.0, 2.0, 2.0, 5.0]), np.array([0.1, 0.2, 0.3, 0.4])
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.arange(1.0, 5.0)
    assert rank_correlation(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(rank_correlation(a, np.ones_like(a)))
        assert np.isnan(rank_correlation(np.zeros((2, 3)), np.arange(6.0).reshape(2, 3)))
    with pytest.raises(ValueError):
        rank_correlation(a, np.ones(3))


def test_demo_ablation_baseline_equals_evaluate():
    from fisherjax import demo

    model = demo.load()
    task = demo.load_tasks(model.tokenizer)["copy"]
    expected = demo.evaluate(model, model.params, task)
    result = ablate_heads(model, model.params, batches(task, 64, buckets=demo.EVAL_BUCKETS))
    assert result.n_samples == expected["num_samples"] == len(task)
    assert result.baseline_accuracy == expected["accuracy"]
    assert result.baseline_loss == pytest.approx(expected["loss_per_token"], rel=1e-5)
    assert result.accuracy.shape == result.loss.shape == (model.config.num_layers, model.config.num_heads)
    assert np.all((result.accuracy >= 0) & (result.accuracy <= 1)) and np.all(result.loss > 0)
