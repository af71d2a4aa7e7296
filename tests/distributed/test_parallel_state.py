"""Process-group setup: launcher detection, backend choice, megatron parallel layouts over gloo."""

import pytest

from sdzero_mcore.parallel import run_local_workers
from sdzero_mcore.parallel.state import DistEnv, detect_dist_env, first_slurm_host, resolve_backend


def test_torchrun_variables():
    env = detect_dist_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234",
         "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    )
    assert env == DistEnv(3, 8, 1, "node7", 1234, "torchrun")  # torchrun wins inside an allocation


def test_slurm_variables():
    env = detect_dist_env(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-05,9]"}
    )
    assert env == DistEnv(5, 16, 1, "gpu03", 29500, "slurm")


def test_single_process_and_bad_values():
    assert detect_dist_env({}).launcher == "single" and detect_dist_env({}).world_size == 1
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        detect_dist_env({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("nodelist, host", [("a1", "a1"), ("gpu[12-15]", "gpu12"), ("n[7,9],m1", "n7"), ("x-1,x-2", "x-1")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_backend_choice():
    assert resolve_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match="one of auto, nccl, gloo"):
        resolve_backend("mpi")


def _layouts_worker():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed("gloo")
    assert dist.get_backend() == "gloo" and dist.get_world_size() == 2
    with pytest.raises(ValueError, match="world size 2 is not divisible by tensor_model_parallel_size=4"):
        initialize_model_parallel(tensor_model_parallel_size=4)
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=2 is not supported; allowed: 1"):
        initialize_model_parallel(pipeline_model_parallel_size=2)
    sizes = initialize_model_parallel(tensor_model_parallel_size=2)
    assert (sizes.tensor, sizes.context, sizes.data) == (2, 1, 1)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    sizes = initialize_model_parallel(context_parallel_size=2)  # re-initialising replaces the layout
    assert (sizes.tensor, sizes.context, sizes.data) == (1, 2, 1)
    assert parallel_state.get_context_parallel_world_size() == 2
    sizes = initialize_model_parallel()
    assert sizes.data == 2 and parallel_state.get_data_parallel_world_size() == 2
    destroy_distributed()
    assert not dist.is_initialized()


def test_megatron_layouts_over_gloo():
    run_local_workers(_layouts_worker, 2)
