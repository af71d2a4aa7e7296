"""Context parallelism end to end (gloo ranks): CP = 2 and CP = 2 x TP = 2 against CP = 1.

A tiny Qwen3-shaped checkpoint is run at several layouts in one world of ranks; at CP = 1 the
other ranks are data-parallel replicas of the same batch. Recorded per layout: the logits gathered
back to sequence order, the parameter gradients of a token-mean cross-entropy, and the Phase 2
distillation loss (and its gradients) on two sequences of different lengths. A tiny Olmo-3 runs at
CP = 2 too: its sliding window (5) is shorter than a CP chunk's reach (21 tokens padded to 24, in
chunks of 6), so windows cross chunk and rank boundaries; its CP = 2 logits are also checked
against transformers'.
"""

import pytest
import torch
from helpers import VOCAB, tiny_mcore

from sdzero_mcore.parallel import run_local_workers

TOL = 1e-4
SEQ = 21  # odd: padded to 24 for CP = 2


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def distill_samples():
    from sdzero_mcore.data.sample import Sample

    generator = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=generator).tolist()

    # different prompt, response and teacher-context lengths; the teacher's sequence is longer
    return [
        Sample(0, prompt_ids=ids(5), response_ids=ids(7), teacher_prefix_ids=ids(17)),
        Sample(1, prompt_ids=ids(3), response_ids=ids(11), teacher_prefix_ids=ids(9)),
    ]


def cp_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    return ids, labels


def cp_worker(mcore_dir: str, layouts: list, out_path: str) -> None:
    import torch.distributed as dist
    from helpers import global_grads
    from megatron.core import parallel_state

    from sdzero_mcore.checkpoint.loading import build_model_from_mcore
    from sdzero_mcore.losses import collate_distill, distill_loss, masked_token_sum, student_logits, teacher_targets
    from sdzero_mcore.models.forward import causal_lm_logits, cp_local_batch
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.trainer import forward_backward, per_token_ddp

    init_distributed("gloo")
    ids, labels = cp_inputs()
    loss_mask = torch.ones(2, SEQ, dtype=torch.bool)
    loss_mask[1, 15:] = False  # a shorter second sequence
    batch = collate_distill(distill_samples(), pad_id=0)
    results = {}

    def fresh_model():  # the trainer's DDP and schedule: per-token loss, normalised by megatron
        return per_token_ddp(build_model_from_mcore(mcore_dir, params_dtype=torch.float32, transformer_impl="local"))

    for tp, cp in layouts:
        initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        record = {"dp": parallel_state.get_data_parallel_world_size()}
        ddp = fresh_model()
        with torch.no_grad():
            record["logits"] = causal_lm_logits(ddp.module, ids)

        # token-mean cross-entropy through megatron's vocab-parallel CE, split over CP
        local = cp_local_batch(ids, {"labels": labels, "loss_mask": loss_mask})

        def ce_step(model, mb):
            per_token = model(mb["input_ids"], mb["position_ids"], None, labels=mb["labels"])
            return per_token, lambda out: (*masked_token_sum(out, mb["loss_mask"]), {})

        record["ce"] = forward_backward(ddp, [local], ce_step)["loss"]
        record["ce_grads"] = global_grads(ddp.module)

        # Phase 2 loss: the frozen teacher is a second copy of the same weights with a longer context
        ddp = fresh_model()
        teacher = build_model_from_mcore(mcore_dir, params_dtype=torch.float32, transformer_impl="local").eval()
        for kl, tail in (("reverse", "renorm"), ("mixed", "bucket")):
            ddp.zero_grad_buffer()
            targets = teacher_targets(teacher, batch, k=8)

            def distill_step(model, _, kl=kl, tail=tail):
                def loss_fn(logits):
                    loss = distill_loss(logits, targets, kl=kl, tail=tail)
                    return loss.loss_sum, loss.num_tokens, {}

                return student_logits(model, batch), loss_fn

            result = forward_backward(ddp, [None], distill_step)
            record[f"distill_{kl}_{tail}"] = result["loss"]
            record[f"distill_{kl}_{tail}_grads"] = global_grads(ddp.module)
            record[f"distill_{kl}_{tail}_tokens"] = result["num_tokens"]
        record["distill_targets"] = (targets.logprobs, targets.ids, targets.loss_mask)
        results[(tp, cp)] = record
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    destroy_distributed()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    tiny_mcore(root)
    return root


@pytest.fixture(scope="module")
def olmo3_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_olmo3")
    tiny_mcore(root, "Olmo3ForCausalLM")
    return root


@pytest.fixture(scope="module")
def cp2(checkpoint):
    run_local_workers(cp_worker, 2, str(checkpoint / "mcore"), [(1, 2), (1, 1)], str(checkpoint / "cp2.pt"))
    return torch.load(checkpoint / "cp2.pt")


@pytest.fixture(scope="module")
def cp2tp2(checkpoint):
    run_local_workers(cp_worker, 4, str(checkpoint / "mcore"), [(2, 2), (1, 1)], str(checkpoint / "cp2tp2.pt"))
    return torch.load(checkpoint / "cp2tp2.pt")


@pytest.fixture(scope="module")
def olmo3_cp2(olmo3_checkpoint):
    root = olmo3_checkpoint
    run_local_workers(cp_worker, 2, str(root / "mcore"), [(1, 2), (1, 1)], str(root / "cp2.pt"))
    return torch.load(root / "cp2.pt")


@pytest.fixture(params=["cp2", "cp2tp2", "olmo3_cp2"])
def runs(request):
    results = request.getfixturevalue(request.param)
    layout = (2, 2) if request.param == "cp2tp2" else (1, 2)
    return request.param, results[layout], results[(1, 1)]


def test_olmo3_cp2_logits_match_transformers(olmo3_checkpoint, olmo3_cp2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(olmo3_checkpoint / "hf", dtype=torch.float32).eval()
    ids, _ = cp_inputs()
    with torch.no_grad():
        reference = model(ids).logits
    diff = (olmo3_cp2[(1, 2)]["logits"] - reference).abs().max().item()
    print(f"Olmo3 CP=2: max |logits - transformers| = {diff:.3e}")
    assert diff < TOL


def test_logits_equal_cp1(runs):
    name, cp, ref = runs
    assert cp["logits"].shape == ref["logits"].shape == (2, SEQ, VOCAB)
    diff = (cp["logits"] - ref["logits"]).abs().max().item()
    print(f"{name}: max |logits - CP1| = {diff:.3e}")
    assert diff < TOL


def test_gradients_equal_cp1(runs):
    name, cp, ref = runs
    assert abs(cp["ce"] - ref["ce"]) < 1e-5
    assert cp["ce_grads"].keys() == ref["ce_grads"].keys() and ref["ce_grads"]
    worst = max(_max_rel(cp["ce_grads"][k], ref["ce_grads"][k]) for k in ref["ce_grads"])
    print(f"{name}: max relative |grad - CP1 grad| = {worst:.3e}")
    assert worst < TOL


@pytest.mark.parametrize("mode", ["reverse_renorm", "mixed_bucket"])
def test_distillation_loss_and_gradients_equal_cp1(runs, mode):
    name, cp, ref = runs
    # the global batch holds one copy of the 7 + 11 response tokens per data-parallel replica
    assert cp[f"distill_{mode}_tokens"] == 18 * cp["dp"]
    assert ref[f"distill_{mode}_tokens"] == 18 * ref["dp"]
    loss, ref_loss = cp[f"distill_{mode}"], ref[f"distill_{mode}"]
    print(f"{name} {mode}: loss {loss:.6f} vs CP1 {ref_loss:.6f}")
    assert ref_loss > 0 and abs(loss - ref_loss) < 1e-5 * max(1.0, ref_loss)
    grads, ref_grads = cp[f"distill_{mode}_grads"], ref[f"distill_{mode}_grads"]
    worst = max(_max_rel(grads[k], ref_grads[k]) for k in ref_grads)
    print(f"{name} {mode}: max relative |grad - CP1 grad| = {worst:.3e}")
    assert worst < TOL


def test_teacher_targets_sit_on_the_response_positions(cp2):
    """18 response tokens in all; the targets at CP = 2 are those of CP = 1."""
    logprobs, ids, mask = cp2[(1, 2)]["distill_targets"]
    ref_logprobs, ref_ids, ref_mask = cp2[(1, 1)]["distill_targets"]
    assert mask.sum().item() == 7 + 11
    # student prompt lengths 5 and 3: the first loss position is the last prompt token
    assert mask[0].nonzero()[0].item() == 4 and mask[1].nonzero()[0].item() == 2
    n = ref_mask.shape[1]
    assert torch.equal(mask[:, :n], ref_mask) and not mask[:, n:].any()
    assert torch.equal(ids[:, :n][ref_mask], ref_ids[ref_mask])
    assert (logprobs[:, :n][ref_mask] - ref_logprobs[ref_mask]).abs().max().item() < 1e-5
