"""HF <-> megatron-core checkpoints: the weight mapping, readers/writers, converters, loaders."""

from sdzero_mcore.checkpoint.atomic import OutputExistsError
from sdzero_mcore.checkpoint.convert import hf_to_mcore, mcore_to_hf
from sdzero_mcore.checkpoint.hf_io import CheckpointError
from sdzero_mcore.checkpoint.loading import build_model_from_hf, build_model_from_mcore

__all__ = [
    "CheckpointError",
    "OutputExistsError",
    "build_model_from_hf",
    "build_model_from_mcore",
    "hf_to_mcore",
    "mcore_to_hf",
]
