"""A colocated SGLang engine at engine TP=2 beside two training ranks (gloo, recording fake engine).

Engine TP rank i runs on GPU i, next to training rank i. A weight payload is a CUDA IPC handle into
the memory of the rank that serialized it, so each engine TP rank must get the one from the
training rank on its own GPU; otherwise every engine worker opens rank 0's memory (a CUDA context
on GPU 0 each). The fake serializer records which rank serialized each payload.
"""

from pathlib import Path

import torch
from helpers import VOCAB

from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.parallel import run_local_workers

ENGINE_TP = 2


def colocated_sync_worker(hf_dir: str, out_path: str) -> None:
    import torch.distributed as dist
    from sglang_fakes import install_fake_sglang

    from sdzero_mcore.checkpoint.loading import build_model_from_hf
    from sdzero_mcore.checkpoint.source import ModelSource
    from sdzero_mcore.config import RolloutConfig, SDZeroConfig
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.rollout.weight_sync import sync_engine, training_engine

    install_fake_sglang()
    init_distributed("gloo")
    initialize_model_parallel(1)
    model = build_model_from_hf(hf_dir, params_dtype=torch.float32, transformer_impl="local")
    cfg = SDZeroConfig(rollout=RolloutConfig(backend="sglang", sglang_tp_size=ENGINE_TP))
    engine = training_engine(cfg, ModelSource(Path(hf_dir), "hf"), None, model)  # the phase's first sync
    sync_engine(engine, model, cfg.rollout.weight_sync_bucket_mb)  # a step's sync, as OnPolicyLoop makes it
    if dist.get_rank() == 0:
        fake = engine.engine
        torch.save({"origins": fake.payload_origins, "loaded": fake.loaded, "tp_size": fake.kwargs["tp_size"]}, out_path)
    else:
        assert engine is None  # the phases' contract: the engine is rank 0's
    destroy_distributed()


def test_each_engine_tp_rank_gets_the_payload_of_the_training_rank_on_its_gpu(tmp_path):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", vocab_size=VOCAB, seed=3)
    out = tmp_path / "record.pt"
    run_local_workers(colocated_sync_worker, 2, str(hf_dir), str(out))
    record = torch.load(out)
    assert record["tp_size"] == ENGINE_TP
    assert len(record["origins"]) >= 2  # two syncs, one payload per bucket and dtype each
    assert record["origins"] == [[0, 1]] * len(record["origins"])
    assert set(record["loaded"].values()) == {2 * ENGINE_TP}  # every weight, by both engine TP ranks, twice
