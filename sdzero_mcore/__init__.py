"""sdzero-mcore: SD-Zero (Self-Distillation Zero, arXiv 2604.12002) on megatron-core."""

__version__ = "0.1.0"
