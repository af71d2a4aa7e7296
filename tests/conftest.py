import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. It is chosen when a kernel is
# defined, so this must happen before anything imports sdzero_kernels (spawned ranks inherit it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers share the cores: each gets its slice of intra-op threads, and so do the
# processes it starts (the CLI tests), or OpenMP threads of two workers spin against each other.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    _threads_per_worker = max(1, (os.cpu_count() or 1) // _XDIST_WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads_per_worker)
    torch.set_num_threads(_threads_per_worker)

# Tiny models: spawned ranks share 2 cores, and tokenizers' thread pool fights with fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TESTS_DIR = Path(__file__).parent
# Spawned workers import helpers by module name; they inherit sys.path from this process.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


# A test's kind is its folder: unit/ (one process), distributed/ (spawns gloo ranks), e2e/ (runs
# phases or the CLI). `pytest -m "not e2e"` is the quick inner loop; `make test` runs them all.
TEST_KINDS = ("unit", "distributed", "e2e")
# The quick demo's file is about a third of the suite on 2 cores: it must start first, not wait
# for a free worker at the end. xdist hands out whole files in collection order
# (`--no-loadscope-reorder` in pytest.ini); the other files follow, those with most tests first.
LONGEST_FILES_FIRST = ("test_demo_and_pipeline.py",)


def _schedule_order(items):
    tests_per_file = {}
    for item in items:
        tests_per_file[str(item.fspath)] = tests_per_file.get(str(item.fspath), 0) + 1

    def key(item):
        path = str(item.fspath)
        return (Path(path).name not in LONGEST_FILES_FIRST, -tests_per_file[path], path)

    items.sort(key=key)  # stable: a file's tests keep their order


def pytest_collection_modifyitems(config, items):
    _schedule_order(items)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        kind = Path(str(item.fspath)).parent.name
        if kind not in TEST_KINDS:
            raise pytest.UsageError(f"{item.fspath}: a test file belongs in tests/unit, tests/distributed or tests/e2e")
        item.add_marker(getattr(pytest.mark, kind))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def megatron_single_rank():
    """A one-process gloo world with megatron's parallel state at TP = CP = 1."""
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed("gloo")
    initialize_model_parallel(1, seed=0)
    yield
    destroy_distributed()
