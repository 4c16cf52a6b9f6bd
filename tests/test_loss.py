"""The token loss and its hand-written VJP against plain autodiff of log-softmax; the labels that
count (a target predicted from padding never does) in every path that computes a loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fisherjax import Model, collect
from fisherjax.data import IGNORE, Example, make_batch, predicted_labels
from fisherjax.grads import per_sample_grads, sample_losses, site_grads, token_nll


def reference_nll(logits, labels):
    """Autodiff-friendly definition: slice the logits, log-softmax, pick the next token."""
    targets = labels[:, 1:]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets != -100, -picked, 0.0)


def _case(seed=0, batch=3, seq=7, vocab=11):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(batch, seq, vocab)) * 3, jnp.float32)
    labels = rng.integers(0, vocab, size=(batch, seq))
    labels[0, 4:] = -100  # right padding
    labels[1, :] = -100  # nothing predicted
    labels[2, 2] = -100  # a hole
    return logits, jnp.asarray(labels, jnp.int32)


def test_values_and_gradient_match_autodiff_of_log_softmax():
    logits, labels = _case()
    np.testing.assert_allclose(token_nll(logits, labels), reference_nll(logits, labels), rtol=1e-6, atol=1e-6)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 6)), jnp.float32)
    ours = jax.grad(lambda z: (token_nll(z, labels) * weights).sum())(logits)
    ref = jax.grad(lambda z: (reference_nll(z, labels) * weights).sum())(logits)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert not np.asarray(ours[1]).any(), "a sample with every label ignored gets no gradient"
    assert not np.asarray(ours[:, -1]).any(), "the last position predicts nothing"


def test_vmapped_per_sample_gradient_and_low_precision_logits():
    logits, labels = _case(seed=2)

    def one(z, y):
        return token_nll(z[None], y[None]).sum()

    per_sample = jax.vmap(jax.grad(one))(logits, labels)
    np.testing.assert_allclose(per_sample, jax.grad(lambda z: reference_nll(z, labels).sum())(logits), rtol=1e-5, atol=1e-6)
    half = jax.grad(lambda z: token_nll(z, labels).sum())(logits.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), jax.grad(lambda z: reference_nll(z, labels).sum())(logits), atol=2e-2)


# --- targets predicted from padding never count, whoever built the batch -------------------------

@pytest.fixture(scope="module")
def model():
    return Model.init(tiny_config("llama"), seed=0)


def _hand_built_pair():
    """A left-padded batch built by hand with labels on every real token (the first included) and
    on padding, and the batch ``make_batch`` builds from the same samples."""
    examples = [Example((5, 6, 7, 8), 0, 0), Example((9, 10), 0, 1), Example((11, 12, 13, 14, 15, 16), 2, 2)]
    right = make_batch(examples, 4, 8, side="left")
    labels = np.where(right.attention_mask == 1, right.input_ids, 17).astype(np.int32)  # 17: a label on padding
    labels[2, 2:4] = IGNORE  # the prompt stays masked
    labels[3] = IGNORE  # filler row
    return right._replace(labels=labels), right


def test_predicted_labels_drop_targets_of_padding():
    hand, made = _hand_built_pair()
    assert (hand.labels != made.labels).any()
    np.testing.assert_array_equal(predicted_labels(hand.labels, hand.attention_mask), made.labels)
    np.testing.assert_array_equal(jax.jit(predicted_labels)(hand.labels, hand.attention_mask), made.labels)


def test_hand_built_left_padding_gives_the_corrected_losses_and_gradients(model):
    hand, made = _hand_built_pair()
    a = per_sample_grads(model, model.params, hand)
    b = per_sample_grads(model, model.params, made)
    np.testing.assert_array_equal(a.tokens, [3, 1, 4, 0])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a.grads, b.grads)
    args = lambda x: (x.input_ids, x.attention_mask, x.labels)  # noqa: E731
    for ours, ref in zip(sample_losses(model, model.params, *args(hand)), sample_losses(model, model.params, *args(made))):
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
    sa, sb = site_grads(model, model.params, *args(hand)), site_grads(model, model.params, *args(made))
    np.testing.assert_array_equal(sa.tokens, b.tokens)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), (sa.deltas, sa.losses), (sb.deltas, sb.losses))


@pytest.mark.parametrize("fisher_type", ["empirical", "true", "per_token"])
def test_hand_built_left_padding_gives_the_corrected_fisher(model, fisher_type):
    hand, made = _hand_built_pair()
    run = lambda b: collect(  # noqa: E731
        model, [b], task="t", progress=False, diagonal=True, fisher_type=fisher_type, key=jax.random.key(3),
        keep_sample_grads=("layers/self_attn/q_proj/kernel",),
    )
    a, b = run(hand), run(made)
    assert (a.n_samples, a.n_tokens) == (b.n_samples, b.n_tokens) == (3, 8)
    np.testing.assert_allclose(a.total_loss, b.total_loss, rtol=1e-6)
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9)  # noqa: E731
    jax.tree.map(close, a.group_fisher, b.group_fisher)
    jax.tree.map(close, a.diagonal, b.diagonal)
    jax.tree.map(close, a.sample_grads.grads, b.sample_grads.grads)
    contributions = lambda f: {p: np.asarray(f.sample_grads.contributions[p]) for p in f.sample_grads.paths}  # noqa: E731
    jax.tree.map(close, contributions(a), contributions(b))
    np.testing.assert_array_equal(a.sample_grads.tokens, [3, 1, 4])


def test_is_argmax_equals_argmax_with_ties():
    """``is_argmax`` agrees with ``jnp.argmax == target`` everywhere, ties included (the first
    index wins): random logits, and rows with the maximum repeated before and after the target."""
    from fisherjax.grads import is_argmax

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5, 11)).astype(np.float32)
    logits[0, :, [2, 7]] = 9.0  # a tie between indices 2 and 7
    logits[1, :, [0, 3, 10]] = 5.0
    logits[2] = np.round(logits[2])  # many ties
    targets = rng.integers(0, 11, size=(6, 5))
    targets[0, :3], targets[0, 3:] = 2, 7
    targets[1, :2], targets[1, 2:] = 3, 0
    targets[3] = np.argmax(logits[3], -1)  # every position a hit
    expected = np.argmax(logits, -1) == targets
    got = np.asarray(is_argmax(jnp.asarray(logits), jnp.asarray(targets)))
    np.testing.assert_array_equal(got, expected)
    assert expected[0, :3].all() and not expected[0, 3:].any() and expected[3].all()


@pytest.mark.parametrize("by_dot", [True, False])
def test_logsumexp_either_way(by_dot, monkeypatch):
    """Both routes of ``grads.logsumexp`` equal float64 numpy: large and negative logits, ``-inf``
    entries, and a row of ``-inf`` only (``-inf``, as ``jax.nn.logsumexp`` gives)."""
    from fisherjax import backend
    from fisherjax.grads import logsumexp

    monkeypatch.setattr(backend, "vocabulary_sums_by_dot", lambda: by_dot)
    x = np.random.default_rng(1).normal(scale=30.0, size=(3, 4, 257)).astype(np.float32)
    x[0, 0, :100] = -np.inf
    x[1, 2] = -np.inf
    got = np.asarray(jax.jit(lambda v: logsumexp(v))(jnp.asarray(x)))  # a new function: traced with the patched route
    with np.errstate(divide="ignore"):
        top = np.max(x, -1, keepdims=True).astype(np.float64)
        expected = np.where(np.isfinite(top[..., 0]), top[..., 0] + np.log(np.exp(x - np.where(np.isfinite(top), top, 0)).sum(-1)), -np.inf)
    assert got[1, 2] == -np.inf
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# --- scores that unembed only the predicted positions ---------------------------------------------


def _reference_scores(logits, labels):
    """float64 numpy: per sample ``(exact, Σ −log p, correct, T)`` over labels ≠ -100 at ``t + 1``,
    with ``argmax`` (first index wins a tie) for a hit."""
    logits = np.asarray(logits, np.float64)[:, :-1]
    targets = np.asarray(labels)[:, 1:]
    valid = targets != IGNORE
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    hit = (logits.argmax(-1) == targets) & valid
    tokens = valid.sum(-1)
    return (hit.sum(-1) == tokens) & (tokens > 0), np.where(valid, -picked, 0).sum(-1), hit.sum(-1), tokens


@pytest.mark.parametrize("chunk", [3, 64])
def test_hidden_scores_equal_the_scores_of_all_logits(chunk):
    """``hidden_scores`` (tiles of ``chunk`` predicted positions) equals float64 numpy scores of the
    full logits: right padding, a prompt, a hole, a row with nothing predicted, ties in the
    vocabulary (two identical unembedding rows, the target the later one: never a hit), a trip
    count that does not divide the positions, and under ``vmap`` (as the masks experiment runs it)."""
    from fisherjax.grads import completion_scores, hidden_scores

    rng = np.random.default_rng(5)
    batch, seq, d, vocab = 4, 9, 6, 13
    hidden = rng.normal(size=(batch, seq, d)).astype(np.float32)
    unembedding = rng.normal(size=(d, vocab)).astype(np.float32)
    unembedding[:, 9] = unembedding[:, 4]  # vocab 4 and 9 tie everywhere
    labels = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
    labels[0, 6:] = IGNORE
    labels[1, :4] = IGNORE  # prompt
    labels[2, :] = IGNORE  # nothing predicted
    labels[3, 5] = IGNORE
    logits = hidden @ unembedding
    labels[3, 1:] = logits[3, :-1].argmax(-1)  # every token a hit: exact
    labels[3, 5] = IGNORE
    labels[0, 3] = 9
    hidden[0, 2] = unembedding[:, 9] * 10  # position 2 predicts a tie of 4 and 9, labelled 9: a miss
    logits = hidden @ unembedding
    unembed = lambda h: h @ jnp.asarray(unembedding)  # noqa: E731
    expected = _reference_scores(logits, labels)
    assert expected[0][3] and not expected[0][0] and expected[3][2] == 0
    got = jax.jit(lambda h, y: hidden_scores(unembed, h, y, chunk=chunk))(jnp.asarray(hidden), jnp.asarray(labels))
    for ours, ref in zip(got, expected):
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)
    losses_only = hidden_scores(unembed, jnp.asarray(hidden), jnp.asarray(labels), chunk=chunk, matches=False)
    np.testing.assert_allclose(np.asarray(losses_only[1]), expected[1], rtol=1e-5, atol=1e-5)
    dense = completion_scores(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(dense[0]))
    scaled = jax.vmap(lambda s: hidden_scores(lambda h: unembed(h) * s, jnp.asarray(hidden), jnp.asarray(labels), chunk=chunk))(
        jnp.asarray([1.0, 2.0])
    )
    np.testing.assert_allclose(np.asarray(scaled[1][1]), _reference_scores(logits * 2, labels)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_forward_scores_equal_scores_of_the_full_pass(model, side):
    """``forward_scores`` (final norm, then only the predicted positions unembedded) equals
    ``completion_scores`` of ``Model.apply``'s logits, either padding side, filler row included;
    ``hidden`` unembedded is ``apply``."""
    from fisherjax.grads import completion_scores, forward_scores

    examples = [Example((5, 6, 7, 8, 3), 0, 0), Example((9, 10), 0, 1), Example((11, 12, 13, 14, 15, 16), 2, 2)]
    b = make_batch(examples, 4, 8, side=side)
    ours = jax.jit(lambda p: forward_scores(model, p, b.input_ids, b.attention_mask, b.labels))(model.params)
    logits = model.apply(model.params, b.input_ids, b.attention_mask)
    ref = completion_scores(logits, predicted_labels(b.labels, b.attention_mask))
    for x, y in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ours[3]), [4, 1, 4, 0])
    real = b.attention_mask.astype(bool)
    hidden = model.hidden(model.params, b.input_ids, b.attention_mask)
    np.testing.assert_allclose(np.asarray(model.unembed(model.params, hidden))[real], np.asarray(logits)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scoring_bytes_bound_the_compiled_forward_scores(family):
    """``scoring_bytes`` is at least XLA's temporaries of a compiled ``forward_scores`` pass and at
    most twice them, for a vocabulary small or large beside the activations: the logits count once
    a pass, not once a row (which would take 4 · rows · seq · vocab bytes)."""
    from fisherjax.grads import forward_scores, scoring_bytes

    seq = 64
    for vocab in (512, 4096):
        config = tiny_config(family, vocab_size=vocab)
        model = Model.abstract(config)
        for rows in (2, 8, 32):
            ids = jax.ShapeDtypeStruct((rows, seq), jnp.int32)
            scores = jax.jit(lambda p, i, m, y: forward_scores(model, p, i, m, y, matches=False)[1])
            temporaries = scores.lower(model.params, ids, ids, ids).compile().memory_analysis().temp_size_in_bytes
            estimate = scoring_bytes(config, rows, seq)
            assert temporaries <= estimate <= 2 * temporaries, (vocab, rows, temporaries, estimate)
