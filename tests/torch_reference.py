"""Independent references computed on Hugging Face's PyTorch models.

Per-sample gradients come from ``torch.func.vmap(grad(...))`` of the token-sum loss (eager
attention, right padding, no forward mask — causal attention never lets a real position see the
padding that follows it — and the loss masked to real labels). Group rules are re-derived here
from the HF tensor names with their own index arithmetic, not through fisherjax's layout.
"""

from __future__ import annotations

import re

import numpy as np


def torch_per_sample_grads(model, ids: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """``{hf_name: [n, *shape]}`` signed token-sum gradients of every parameter."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, ids_i, labels_i):
        logits = functional_call(model, p, (ids_i[None],)).logits[0, :-1]
        target = labels_i[1:]
        valid = target != -100
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, target.clamp(min=0)[:, None])[:, 0]
        return (nll * valid).sum()

    # HF warns about padding by inspecting token values (`.item()`), which vmap cannot trace;
    # the check is skipped when the config has no pad token.
    pad, model.config.pad_token_id = model.config.pad_token_id, None
    try:
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(
            params, torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
        )
    finally:
        model.config.pad_token_id = pad
    return {k: v.numpy().astype(np.float64) for k, v in grads.items()}


# HF name (regex with the layer as group 1, or none) → fisherjax flat path
HF_TO_OURS = {
    "gpt2": [
        (r"transformer\.wte\.weight", "embed/embedding", False),
        (r"transformer\.wpe\.weight", "pos_embed/embedding", False),
        (r"transformer\.ln_f\.weight", "final_norm/scale", False),
        (r"transformer\.ln_f\.bias", "final_norm/bias", False),
        (r"transformer\.h\.(\d+)\.ln_(\d)\.weight", "layers/ln_{1}/scale", False),
        (r"transformer\.h\.(\d+)\.ln_(\d)\.bias", "layers/ln_{1}/bias", False),
        (r"transformer\.h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)\.weight", "layers/{1}/{2}/kernel", False),
        (r"transformer\.h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)\.bias", "layers/{1}/{2}/bias", False),
    ],
    "llama": [
        (r"model\.embed_tokens\.weight", "embed/embedding", False),
        (r"model\.norm\.weight", "final_norm/scale", False),
        (r"lm_head\.weight", "lm_head/kernel", True),
        (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", "layers/{1}/scale", False),
        (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight", "layers/{1}/{2}/kernel", True),
        (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.bias", "layers/{1}/{2}/bias", False),
    ],
    "gpt_neox": [
        (r"gpt_neox\.embed_in\.weight", "embed/embedding", False),
        (r"embed_out\.weight|lm_head\.weight", "lm_head/kernel", True),
        (r"gpt_neox\.final_layer_norm\.weight", "final_norm/scale", False),
        (r"gpt_neox\.final_layer_norm\.bias", "final_norm/bias", False),
        (r"gpt_neox\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", "layers/{1}/scale", False),
        (r"gpt_neox\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.bias", "layers/{1}/bias", False),
        (r"gpt_neox\.layers\.(\d+)\.(attention|mlp)\.(\w+)\.weight", "layers/{1}/{2}/kernel", True),
        (r"gpt_neox\.layers\.(\d+)\.(attention|mlp)\.(\w+)\.bias", "layers/{1}/{2}/bias", False),
    ],
}
HF_TO_OURS["mistral"] = HF_TO_OURS["qwen2"] = HF_TO_OURS["llama"]


def our_location(kind: str, hf_name: str) -> tuple[str, int | None, bool]:
    """(flat path, layer or None, whether the HF tensor is the transpose of ours)."""
    for pattern, template, transposed in HF_TO_OURS[kind]:
        m = re.fullmatch(pattern, hf_name)
        if m:
            groups = m.groups()
            layered = pattern.count(r"(\d+)") and template.startswith("layers/")
            layer = int(groups[0]) if layered else None
            return template.format(*groups), layer, transposed
    raise KeyError(f"{kind}: no mapping for {hf_name}")


def reference_groups(kind: str, hf_name: str, c: np.ndarray, heads: int, kv_heads: int, head_dim: int) -> dict[str, np.ndarray]:
    """Group sums of an elementwise array ``c`` of one HF tensor, by the rules of DESIGN.md.

    ``c`` has the HF tensor's own shape (Linear weights ``[out, in]``, Conv1D ``[in, out]``).
    """
    name = hf_name
    H, K, hd = heads, kv_heads, head_dim
    if re.search(r"(wte|wpe|embed_tokens|embed_in)\.weight$", name):
        return {"row": c.sum(1)}
    if re.search(r"(lm_head|embed_out)\.weight$", name):
        return {"row": c.sum(1)}  # [vocab, d]: one row per vocabulary entry
    if "norm" in name or re.search(r"ln_(\d|f)\.", name):
        return {"element": c}
    if kind == "gpt2":
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            cols = c if c.ndim == 1 else c.sum(0)  # Conv1D [in, 3d]: columns are outputs
            d = H * hd
            return {f"head_{b}": cols[i * d : (i + 1) * d].reshape(H, hd).sum(1) for i, b in enumerate("qkv")}
        if name.endswith("attn.c_proj.weight"):
            return {"head": c.sum(1).reshape(H, hd).sum(1)}  # rows are the concatenated heads
        if name.endswith("mlp.c_fc.weight"):
            return {"channel": c.sum(0)}
        if name.endswith("mlp.c_proj.weight"):
            return {"channel": c.sum(0), "neuron": c.sum(1)}
        return {"element": c}
    if kind == "gpt_neox":
        if "query_key_value" in name:
            rows = c if c.ndim == 1 else c.sum(1)  # Linear [3d, in]: rows are outputs
            per = rows.reshape(H, 3, hd).sum(-1)
            return {"head_q": per[:, 0], "head_k": per[:, 1], "head_v": per[:, 2]}
        if name.endswith("attention.dense.weight"):
            return {"head": c.sum(0).reshape(H, hd).sum(1)}  # Linear [d, H*hd]: columns are heads
        if name.endswith("dense_h_to_4h.weight"):
            return {"channel": c.sum(1)}
        if name.endswith("dense_4h_to_h.weight"):
            return {"channel": c.sum(1), "neuron": c.sum(0)}
        return {"element": c}
    # Llama family: Linear weights [out, in]
    for proj, n in (("q_proj", H), ("k_proj", K), ("v_proj", K)):
        if f"{proj}." in name:
            rows = c if c.ndim == 1 else c.sum(1)
            return {"head": rows.reshape(n, hd).sum(1)}
    if name.endswith("o_proj.weight"):
        return {"head": c.sum(0).reshape(H, hd).sum(1)}
    if name.endswith("gate_proj.weight") or name.endswith("up_proj.weight"):
        return {"channel": c.sum(1)}
    if name.endswith("down_proj.weight"):
        return {"channel": c.sum(1), "neuron": c.sum(0)}
    return {"element": c}
