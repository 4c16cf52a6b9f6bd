"""The activation functions the decoders support, by their Hugging Face names (``ACT2FN`` keys).

One table: :mod:`fisherjax.config` checks a config's ``hidden_act`` / ``activation_function``
against its names, the decoders (:mod:`fisherjax.models.common`) call its functions.
"""

from __future__ import annotations

import jax

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
