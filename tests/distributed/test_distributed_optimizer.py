"""optimizer.distributed: megatron-core's DistributedOptimizer at DP=2 against the AdamW path,
its sharded state, bit-exact resume, and a DP=2 checkpoint resumed at DP=1.

One spawned world of two ranks runs every DP=2 check; the DP=1 resume runs in the test process."""

import math
from pathlib import Path

import pytest
import torch
from helpers import VOCAB

from sdzero_mcore.config import OptimizerConfig
from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.parallel import run_local_workers

STEPS = 5
RESUME_AT = 2
# the clip (0.5) is below the first steps' gradient norms (about 1.9): clipping is exercised
OPTIM = dict(lr=1e-3, lr_schedule="cosine", warmup_steps=2, warmup_start_factor=0.1, clip_grad=0.5,
             weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-7)


def ce_step(model, batch):
    """Cross-entropy through megatron's vocab-parallel CE, in the per-token contract."""
    from sdzero_mcore.losses.masked import masked_token_sum

    ids, labels = batch
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    per_token = model(ids, positions, None, labels=labels)
    return per_token, lambda out: (*masked_token_sum(out, torch.ones_like(out, dtype=torch.bool)), {})


def batches(step: int, dp_rank: int) -> list:
    """Data-parallel rank ``dp_rank``'s two micro-batches of step ``step`` (different every step and rank)."""
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    return [(torch.randint(0, VOCAB, (2, 12), generator=g), torch.randint(0, VOCAB, (2, 12), generator=g)) for _ in range(2)]


def make_trainer(hf_dir, run_dir, phase, *, distributed, dtype=torch.float32):
    from sdzero_mcore.checkpoint.loading import build_model_from_hf
    from sdzero_mcore.parallel import initialize_model_parallel
    from sdzero_mcore.trainer import Trainer

    initialize_model_parallel(1, seed=5)
    model = build_model_from_hf(hf_dir, params_dtype=dtype, transformer_impl="local")
    return Trainer(model, OptimizerConfig(**OPTIM, distributed=distributed), total_steps=STEPS, run_dir=run_dir,
                   phase=phase, hf_files_dir=hf_dir)


def state_numel(trainer) -> int:
    """Elements of this rank's optimizer state: moments, and masters that are copies (no step counters)."""
    return sum(t.numel() for t in trainer.optimizer_state_tensors() if t.dim() > 0)


def global_optimizer_state(trainer) -> dict:
    """The distributed optimizer's fp32 master and moments of every parameter, whole (gathered over DP)."""
    import torch.distributed as dist

    optimizer = trainer.optimizer.chained_optimizers[0]
    names = {param: name for name, param in trainer.model.named_parameters()}
    local = {}
    for param in optimizer.model_param_group_index_map:  # the parameters with a slice on this rank
        span = optimizer._get_model_param_range_map(param)["param"]
        tensors = optimizer._get_main_param_and_optimizer_states(param)
        local[names[param]] = (span.start, span.end, param.numel(),
                               {k: v.detach().clone() for k, v in tensors.items() if v.dim() > 0})
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    whole, covered = {}, {}
    for part in parts:
        for name, (start, end, numel, tensors) in part.items():
            target = whole.setdefault(name, {k: torch.full((numel,), math.nan) for k in tensors})
            for key, value in tensors.items():
                target[key][start:end] = value
            covered[name] = covered.get(name, 0) + end - start
    assert all(covered[name] == whole[name]["param"].numel() for name in whole), "a parameter slice is missing"
    return whole


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def dp2_worker(hf_dir: str, run_dir: str, out_path: str) -> None:
    import torch.distributed as dist

    from sdzero_mcore.parallel import destroy_distributed, init_distributed

    init_distributed("gloo")
    rank = dist.get_rank()
    out = {}

    adamw = make_trainer(hf_dir, run_dir, "adamw", distributed=False)
    out["adamw"] = [adamw.train_step(batches(s, rank), ce_step) for s in range(STEPS)]
    out["adamw_numel"] = state_numel(adamw)
    out["adamw_ckpt"] = str(adamw.save_checkpoint())

    trainer = make_trainer(hf_dir, run_dir, "distributed", distributed=True)
    out["distributed"] = []
    for step in range(STEPS):
        if step == RESUME_AT:
            trainer.state.data = {"offset": step}
            out["ckpt"] = str(trainer.save_checkpoint())
            out["saved_state"] = global_optimizer_state(trainer)
        out["distributed"].append(trainer.train_step(batches(step, rank), ce_step))
    numels = [None, None]
    dist.all_gather_object(numels, state_numel(trainer))
    out["distributed_numel"] = numels
    params = [torch.empty(0), torch.empty(0)]
    dist.all_gather_object(params, flat_params(trainer.model))
    out["params_equal_across_ranks"] = torch.equal(*params)
    out["final_params"] = flat_params(trainer.model)

    resumed = make_trainer(hf_dir, run_dir, "distributed", distributed=True)
    resumed.load_checkpoint(Path(out["ckpt"]))
    out["resumed_data"] = resumed.state.data
    out["resumed_state"] = global_optimizer_state(resumed)
    out["resumed"] = [resumed.train_step(batches(s, rank), ce_step) for s in range(RESUME_AT, STEPS)]
    out["resumed_params"] = flat_params(resumed.model)

    # bf16 weights: fp32 master slices inside megatron-core's optimizer, against the AdamW path's masters
    for distributed in (False, True):
        bf16 = make_trainer(hf_dir, run_dir, f"bf16_{distributed}", distributed=distributed, dtype=torch.bfloat16)
        out[f"bf16_{distributed}"] = [bf16.train_step(batches(s, rank), ce_step)["loss"] for s in range(3)]
        out[f"bf16_{distributed}_masters"] = sum(t.numel() for t in bf16.optimizer_state_tensors() if t.dtype == torch.float32)
        out[f"bf16_{distributed}_params"] = {p.dtype for p in bf16.model.parameters()}
    if rank == 0:
        torch.save(out, out_path)
    destroy_distributed()


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed_optimizer")
    hf_dir = save_tiny_hf_model(root / "hf", vocab_size=VOCAB)
    run_local_workers(dp2_worker, 2, str(hf_dir), str(root / "run"), str(root / "out.pt"))
    return torch.load(root / "out.pt", weights_only=False), hf_dir, root


def test_loss_trajectory_equals_adamw_path(dp2):
    out, _, _ = dp2
    adamw, distributed = out["adamw"], out["distributed"]
    for a, d in zip(adamw, distributed):
        print(f"loss {a['loss']:.9f} vs {d['loss']:.9f}  grad_norm {a['grad_norm']:.7f} vs {d['grad_norm']:.7f}  lr {a['lr']} vs {d['lr']}")
        assert d["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert d["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)  # megatron's fp32 norm vs the float64 one
        assert d["lr"] == a["lr"] and not d["skipped"]  # the same schedule (warmup from 0.1, cosine)
    print("max relative difference: loss", max(abs(d["loss"] - a["loss"]) / a["loss"] for a, d in zip(adamw, distributed)),
          "grad norm", max(abs(d["grad_norm"] - a["grad_norm"]) / a["grad_norm"] for a, d in zip(adamw, distributed)))
    assert adamw[0]["grad_norm"] > 2 * OPTIM["clip_grad"]
    assert max(abs(d["loss"] - a["loss"]) / a["loss"] for a, d in zip(adamw[1:], distributed[1:])) > 0  # the weights moved
    assert out["params_equal_across_ranks"]  # the all-gather after each step leaves every DP rank the same weights


def test_each_rank_holds_half_the_optimizer_state(dp2):
    out, _, _ = dp2
    full, shards = out["adamw_numel"], out["distributed_numel"]
    print(f"AdamW path: {full} state elements per rank; distributed optimizer: {shards}")
    assert sum(shards) == full  # together the ranks hold every element once
    assert max(shards) <= 0.51 * full


def test_resume_is_bit_exact(dp2):
    out, _, _ = dp2
    ckpt = Path(out["ckpt"])
    # the sharded state is a dist checkpoint inside the (atomically renamed) step directory
    assert (ckpt / "distrib_optimizer" / "metadata.json").is_file() and not list(ckpt.glob("optimizer_tp*.pt"))
    assert (ckpt / "sdzero_checkpoint.json").is_file() and not list(ckpt.parent.glob(".*tmp*"))
    assert out["resumed_data"] == {"offset": RESUME_AT}
    for name, saved in out["saved_state"].items():
        for key, value in saved.items():
            assert torch.equal(out["resumed_state"][name][key], value), (name, key)
    straight = [m["loss"] for m in out["distributed"][RESUME_AT:]]
    assert [m["loss"] for m in out["resumed"]] == straight
    assert [m["grad_norm"] for m in out["resumed"]] == [m["grad_norm"] for m in out["distributed"][RESUME_AT:]]
    assert torch.equal(out["resumed_params"], out["final_params"])


def test_bf16_params_train_through_sharded_fp32_masters(dp2):
    out, _, _ = dp2
    assert torch.bfloat16 in out["bf16_True_params"] and out["bf16_True_params"] == out["bf16_False_params"]
    # the fp32 masters (and moments) of the bf16 weights: half of the AdamW path's on each rank
    assert out["bf16_True_masters"] <= 0.51 * out["bf16_False_masters"]
    print("bf16 losses AdamW", out["bf16_False"], "distributed", out["bf16_True"])
    for a, d in zip(out["bf16_False"], out["bf16_True"]):
        assert d == pytest.approx(a, rel=1e-4)


def test_dp2_checkpoint_resumes_at_dp1(dp2, megatron_single_rank):
    out, hf_dir, root = dp2
    trainer = make_trainer(hf_dir, root / "run_dp1", "dp1", distributed=True)
    trainer.load_checkpoint(Path(out["ckpt"]))
    state = global_optimizer_state(trainer)
    assert state.keys() == out["saved_state"].keys()
    for name, saved in out["saved_state"].items():
        for key, value in saved.items():
            assert torch.equal(state[name][key], value), (name, key)
    # one rank runs both DP ranks' micro-batches: the same global batch
    for step, reference in zip(range(RESUME_AT, STEPS), out["distributed"][RESUME_AT:]):
        metrics = trainer.train_step(batches(step, 0) + batches(step, 1), ce_step)
        print(f"step {step}: DP=1 {metrics['loss']:.9f} DP=2 {reference['loss']:.9f}")
        assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-6)

    with pytest.raises(ValueError, match="optimizer.distributed=false"):
        make_trainer(hf_dir, root / "run_dp1", "dp1_from_adamw", distributed=True).load_checkpoint(Path(out["adamw_ckpt"]))
