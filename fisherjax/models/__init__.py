"""Flax (nnx) decoders for the GPT-2, Llama (Llama, Mistral, Qwen2) and GPT-NeoX families."""

from fisherjax.models.decoder import Decoder, DecoderOutput
from fisherjax.models.hf import load_pretrained, save_pretrained, to_hf_tensors
from fisherjax.models.model import Model, check_token_ids

__all__ = ["Decoder", "DecoderOutput", "Model", "check_token_ids", "load_pretrained", "save_pretrained", "to_hf_tensors"]
