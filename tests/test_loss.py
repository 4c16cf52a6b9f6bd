"""The token loss and its hand-written VJP against plain autodiff of log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np

from fisherjax.grads import token_nll


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
