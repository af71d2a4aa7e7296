"""Process-group setup: launcher detection, backend choice, megatron parallel layouts over gloo."""

import datetime
import json
import time
from pathlib import Path

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
    with pytest.raises(ValueError, match="x pipeline_model_parallel_size=2"):
        initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    sizes = initialize_model_parallel(pipeline_model_parallel_size=2)
    assert (sizes.tensor, sizes.pipeline, sizes.data) == (1, 2, 1)
    assert parallel_state.get_pipeline_model_parallel_world_size() == 2
    assert parallel_state.get_pipeline_model_parallel_rank() == dist.get_rank()
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


def _hierarchical_cp_worker():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from sdzero_mcore.config import load_config
    from sdzero_mcore.parallel import destroy_distributed
    from sdzero_mcore.run_setup import setup_parallel

    cfg = load_config(overrides=["parallel.backend=gloo", "parallel.context_parallel_size=2",
                                 "parallel.cp_comm_type=a2a+p2p", "parallel.hierarchical_context_parallel_sizes=[2,1]"])
    setup_parallel(cfg)
    groups = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
    # what TE's a2a+p2p attention reads: the a2a level over both CP ranks, then the p2p level
    assert groups is not None, "a2a+p2p without hierarchical CP groups: TE would get cp_group=None"
    assert [dist.get_world_size(g) for g in groups] == [2, 1]
    destroy_distributed()


def test_hierarchical_cp_groups_are_created_for_a2a_p2p():
    run_local_workers(_hierarchical_cp_worker, 2)


def _handoff_worker(out_dir: str):
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _set_pg_timeout

    from sdzero_mcore.parallel import destroy_distributed, handoff_group, init_distributed, initialize_model_parallel
    from sdzero_mcore.parallel.rank0 import broadcast_object

    init_distributed("gloo")
    initialize_model_parallel()
    assert dist.get_backend(handoff_group()) == "gloo"
    # the default group's collectives time out after 2 s (NCCL's parallel.timeout_minutes, shrunk):
    # a rank waiting in one for a rollout that takes longer is killed
    _set_pg_timeout(datetime.timedelta(seconds=2))
    dist.barrier()
    rollout = None
    if dist.get_rank() == 0:
        time.sleep(5)  # generating and scoring: longer than the default group's timeout
        rollout = [{"question": 3, "response_ids": list(range(40)), "reward": 1}, {"question": 5, "response_ids": [], "reward": 0}]
    received = broadcast_object(rollout)
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(received))
    destroy_distributed()


def test_rollout_handoff_outlasts_the_default_groups_timeout(tmp_path):
    run_local_workers(_handoff_worker, 2, str(tmp_path))
    received = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert received[0] == received[1] and received[1][0]["response_ids"] == list(range(40))


def _group_release_worker():
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.parallel.state import release_model_parallel

    init_distributed("gloo")
    initialize_model_parallel(tensor_model_parallel_size=2)
    live = len(_world.pg_map)
    # a second phase in the same process (sdzero run) builds its groups again: the first phase's
    # communicators must be destroyed, not only forgotten by megatron
    initialize_model_parallel(tensor_model_parallel_size=2)
    assert len(_world.pg_map) == live, f"{len(_world.pg_map) - live} process groups leaked by re-initialising"
    release_model_parallel()
    assert list(_world.pg_map) == [dist.group.WORLD], "only the default group outlives the phase's groups"
    destroy_distributed()


def test_reinitialising_destroys_the_previous_groups():
    run_local_workers(_group_release_worker, 2)
