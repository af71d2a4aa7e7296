"""megatron-core GPT models built from HF configs.

The names below load on first use (PEP 562): importing megatron-core costs seconds, and the
command line reads `hf_config` (the supported architectures) for `--help` and argument checks
without needing a model.
"""

import importlib

_EXPORTS = {
    "build_gpt_model": "sdzero_mcore.models.builder",
    "layer_spec_for": "sdzero_mcore.models.builder",
    "transformer_config_for": "sdzero_mcore.models.builder",
    "causal_lm_logits": "sdzero_mcore.models.forward",
    "SUPPORTED_ARCHITECTURES": "sdzero_mcore.models.hf_config",
    "ModelArch": "sdzero_mcore.models.hf_config",
    "UnsupportedModelError": "sdzero_mcore.models.hf_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
