"""megatron-core GPT models built from HF configs.

The names below load their module on first use (``sdzero_mcore.lazy_exports``): the command line
reads ``hf_config`` (the supported architectures) for ``--help`` and argument checks without
needing a model, or megatron-core.
"""

from sdzero_mcore.lazy_exports import lazy_getattr

_HOME = {
    "build_gpt_model": "builder",
    "layer_spec_for": "builder",
    "transformer_config_for": "builder",
    "causal_lm_logits": "forward",
    "SUPPORTED_ARCHITECTURES": "hf_config",
    "ModelArch": "hf_config",
    "UnsupportedModelError": "hf_config",
}

__all__ = sorted(_HOME)

__getattr__ = lazy_getattr(__name__, _HOME)
