"""The trainer's per-token contract: however a step's sequences are split into micro-batches and
over DP or CP ranks, the gradient is that of the token mean over the global batch.

Four sequences with 3, 9, 14 and 6 loss tokens. At DP = 2 (two gloo processes) and at CP = 2,
each layout runs them as one micro-batch per rank and as several micro-batches of different
token counts (DP ranks with different numbers of micro-batches too), through
``trainer.forward_backward`` (megatron-core's schedule and ``finalize_model_grads``). Every
result must equal a plain autograd reference on one process: sum of the masked cross-entropy
over all four sequences / 32.
"""

import pytest
import torch
from helpers import VOCAB, global_grads, tiny_qwen3_mcore

from sdzero_mcore.parallel import run_local_workers

SEQ = 16
LOSS_TOKENS = (3, 9, 14, 6)


def _sequences():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (len(LOSS_TOKENS), SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (len(LOSS_TOKENS), SEQ), generator=g)
    mask = torch.zeros(len(LOSS_TOKENS), SEQ, dtype=torch.bool)
    for row, n in enumerate(LOSS_TOKENS):
        mask[row, SEQ - n - 1 : SEQ - 1] = True
    return ids, labels, mask


def _ce_step(model, mb):
    from sdzero_mcore.losses.masked import masked_token_sum

    per_token = model(mb["input_ids"], mb["position_ids"], None, labels=mb["labels"])
    return per_token, lambda out: (*masked_token_sum(out, mb["mask"]), {"rows": torch.tensor(float(len(out)))})


def contract_worker(mcore_dir: str, out_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from sdzero_mcore.checkpoint.loading import build_model_from_mcore
    from sdzero_mcore.models.forward import cp_local_batch
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.trainer import forward_backward, per_token_ddp

    init_distributed("gloo")
    rank = dist.get_rank()
    ids, labels, mask = _sequences()
    results = {}

    def micro(rows):
        return cp_local_batch(ids[rows], {"labels": labels[rows], "mask": mask[rows]})

    # (layout, name) -> this rank's micro-batches (rows of the global batch)
    layouts = {
        "dp2": (1, {"one_each": [[0, 1]] if rank == 0 else [[2, 3]],
                    "split": [[0], [1]] if rank == 0 else [[2, 3]],
                    "uneven": [[0], [1], [2]] if rank == 0 else [[3]]}),
        "cp2": (2, {"one": [[0, 1, 2, 3]], "split": [[0], [1, 2], [3]]}),
    }
    for layout, (cp, cases) in layouts.items():
        initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=cp, seed=3)
        for name, rows in cases.items():
            ddp = per_token_ddp(build_model_from_mcore(mcore_dir, params_dtype=torch.float32, transformer_impl="local"))
            logs = forward_backward(ddp, [micro(r) for r in rows], _ce_step)
            results[(layout, name)] = {"loss": logs["loss"], "num_tokens": logs["num_tokens"], "rows": logs["rows"],
                                       "grads": global_grads(ddp.module),
                                       "dp": parallel_state.get_data_parallel_world_size()}
    # the reference: plain autograd of the global token mean, all four rows in one process (TP = CP = 1:
    # the forward runs no collective), no DDP, no schedule
    initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=1, seed=3)
    model = build_model_from_mcore(mcore_dir, params_dtype=torch.float32, transformer_impl="local")
    per_token = model(ids, torch.arange(SEQ).expand(len(LOSS_TOKENS), -1), None, labels=labels)
    loss = torch.where(mask, per_token, 0.0).sum() / mask.sum()
    loss.backward()
    for param in model.parameters():
        param.main_grad = param.grad
    results["reference"] = {"loss": loss.item(), "grads": global_grads(model)}
    if rank == 0:
        torch.save(results, out_path)
    destroy_distributed()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    run_local_workers(contract_worker, 2, str(tiny_qwen3_mcore(root)), str(root / "out.pt"))
    return torch.load(root / "out.pt", weights_only=False)


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("case", [("dp2", "one_each"), ("dp2", "split"), ("dp2", "uneven"), ("cp2", "one"), ("cp2", "split")])
def test_gradient_is_the_global_token_mean_whatever_the_micro_batching(results, case):
    ref, got = results["reference"], results[case]
    # CP ranks share the batch: its tokens are counted once per data-parallel replica
    assert got["num_tokens"] == sum(LOSS_TOKENS)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    worst = max(_max_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"])
    print(f"{case}: loss {got['loss']:.6f} (reference {ref['loss']:.6f}), max relative grad error {worst:.2e}")
    assert worst < 1e-5


def test_split_and_unsplit_steps_agree(results):
    for layout, a, b in (("dp2", "one_each", "split"), ("dp2", "one_each", "uneven"), ("cp2", "one", "split")):
        one, other = results[(layout, a)]["grads"], results[(layout, b)]["grads"]
        assert max(_max_rel(other[k], one[k]) for k in one) < 1e-6


def test_logs_are_summed_over_micro_batches_and_ranks(results):
    # "rows" counts the rows each rank's micro-batches saw: 4 in all at DP = 2; 4 per CP rank at CP = 2
    assert results[("dp2", "uneven")]["rows"] == 4
    assert results[("cp2", "split")]["rows"] == 8
