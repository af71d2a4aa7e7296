"""megatron-core GPT models built from HF configs."""

from sdzero_mcore.models.builder import build_gpt_model, layer_spec_for, transformer_config_for
from sdzero_mcore.models.forward import causal_lm_logits
from sdzero_mcore.models.hf_config import SUPPORTED_ARCHITECTURES, ModelArch, UnsupportedModelError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelArch",
    "UnsupportedModelError",
    "build_gpt_model",
    "causal_lm_logits",
    "layer_spec_for",
    "transformer_config_for",
]
