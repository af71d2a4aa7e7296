import os
import sys
from pathlib import Path

import pytest

# Tiny models: spawned ranks share 2 cores, and tokenizers' thread pool fights with fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
# Spawned workers import helpers by module name; they inherit sys.path from this process.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def pytest_collection_modifyitems(config, items):
    if not any(True for _ in items):
        return
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
