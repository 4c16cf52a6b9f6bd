"""Logits of fisherjax's Flax decoders equal Hugging Face's PyTorch models (≤ 1e-4, float32)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FAMILIES, padded_batch

torch = pytest.importorskip("torch")

import fisherjax  # noqa: E402
from fisherjax.models.common import positions_from_mask  # noqa: E402


def torch_logits(model, ids, mask):
    positions = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_match_hugging_face(kind, side, hf_checkpoint):
    directory, torch_model = hf_checkpoint(kind)
    model = fisherjax.load_pretrained(directory)
    ids, mask = padded_batch(np.random.default_rng(1), lengths=[12, 7, 3, 12], seq=12, side=side)
    ours = np.asarray(model.apply(model.params, ids, mask))
    ref = torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    err = np.abs(ours[real] - ref[real]).max()
    print(f"{kind}/{side}: max |Δlogit| = {err:.2e}")  # shown by `pytest -rP`; the closing notes quote it
    assert err <= 1e-4, f"{kind}/{side}: max |Δlogit| = {err:.2e}"


@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_from_any_layer_resume_the_pass(kind, hf_checkpoint):
    """``residual_stream`` records every block's input; ``logits_from`` that input and layer gives
    the HF logits, and with a later layer's parameters changed it equals the full pass of the
    changed parameters (what single-head ablation relies on)."""
    import jax

    directory, torch_model = hf_checkpoint(kind)
    model = fisherjax.load_pretrained(directory)
    ids, mask = padded_batch(np.random.default_rng(4), lengths=[10, 6], seq=10, side="right")
    stream, logits = model.residual_stream(model.params, ids, mask)
    real = mask.astype(bool)
    ref = torch_logits(torch_model, ids, mask)
    assert stream.shape[:2] == (model.config.num_layers, 2)
    changed = jax.tree.map(lambda x: x * 1.5, model.params)
    layers = dict(changed)
    layers["layers"] = jax.tree.map(lambda new, old: new.at[:1].set(old[:1]), changed["layers"], model.params["layers"])
    layers = {k: (model.params[k] if k != "layers" else v) for k, v in layers.items()}  # only blocks ≥ 1 changed
    for layer in range(model.config.num_layers):
        resumed = np.asarray(model.logits_from(model.params, stream[layer], mask, layer))
        assert np.abs(resumed[real] - ref[real]).max() <= 1e-4
    full = np.asarray(model.apply(layers, ids, mask))
    np.testing.assert_allclose(np.asarray(model.logits_from(layers, stream[1], mask, 1))[real], full[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[real], ref[real], atol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
def test_padding_side_does_not_change_real_logits(kind, hf_checkpoint):
    directory, _ = hf_checkpoint(kind)
    model = fisherjax.load_pretrained(directory)
    rng = np.random.default_rng(2)
    ids_r, mask_r = padded_batch(rng, lengths=[9, 4], seq=10, side="right")
    ids_l = np.zeros_like(ids_r)
    mask_l = np.zeros_like(mask_r)
    for i, n in enumerate([9, 4]):
        ids_l[i, 10 - n :] = ids_r[i, :n]
        mask_l[i, 10 - n :] = 1
    right = np.asarray(model.apply(model.params, ids_r, mask_r))
    left = np.asarray(model.apply(model.params, ids_l, mask_l))
    for i, n in enumerate([9, 4]):
        np.testing.assert_allclose(right[i, :n], left[i, 10 - n :], atol=1e-5)


@pytest.mark.parametrize("kind", FAMILIES)
def test_attention_probabilities_match_hugging_face(kind, hf_checkpoint):
    directory, torch_model = hf_checkpoint(kind)
    model = fisherjax.load_pretrained(directory)
    ids, mask = padded_batch(np.random.default_rng(3), lengths=[8, 8], seq=8, side="right")
    ours = np.asarray(model.attentions(model.params, ids, mask))  # [layer, batch, heads, q, k]
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids, dtype=torch.long), output_attentions=True).attentions
    ref = np.stack([a.numpy() for a in ref])
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)
