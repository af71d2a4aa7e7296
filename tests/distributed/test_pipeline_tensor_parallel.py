"""Pipeline x tensor parallelism, PP = 2 x TP = 2 (four gloo ranks), against PP = 1 x TP = 1.

A tiny Qwen2.5 (untied embeddings, QKV biases, 4 layers) from a HF directory. In one world, at
PP = 1 x TP = 1 (every rank the same model) and at PP = 2 x TP = 2 (and, for the combinations
below, at the other four-rank layouts):

* logits (gathered over TP on the last stage), the per-token loss over micro-batches of different
  lengths, and every parameter's gradient (gathered over TP, stages by global layer);
* a Phase 2 step with the sparse LM head (the default; untied output layer): the frozen teacher's
  top-K through the forward-only schedule on the last stage, the student's ``topk_kl`` there from
  its final-norm hidden states, one optimizer step: loss and grad norm;
* the trainer's checkpoint of that step, written at PP = 2 x TP = 2, loaded at PP = 1 x TP = 1:
  the same logits as the PP = 2 x TP = 2 model after the step.

The same logits, CE loss and gradients, and Phase 2 step (loss, grad norm) at the other layouts of
four ranks that combine these parallelisms: PP = 2 x CP = 2, PP = 2 x VPP = 2 x TP = 2 (one layer
per model chunk), in fp32 and against a bf16 reference in bf16, and TP = 2 x DP = 2 with
megatron-core's distributed optimizer.
"""

import pytest
import torch
from helpers import VOCAB, ce_forward_step, global_grads, max_rel

from sdzero_mcore.parallel import run_local_workers

LAYERS = 4
LENGTHS = (7, 12, 4)
# (TP, PP, CP, VPP, distributed optimizer, dtype): the references, PP x TP (every check), the combinations
REFERENCE, PP_TP = (1, 1, 1, None, False, "float32"), (2, 2, 1, None, False, "float32")
REFERENCE_BF16 = (1, 1, 1, None, False, "bfloat16")
COMBINATIONS = {
    "PP=2 x CP=2": (1, 2, 2, None, False, "float32"),
    "PP=2 x VPP=2 x TP=2": (2, 2, 1, 2, False, "float32"),
    "TP=2 x DP=2, distributed optimizer": (2, 1, 1, None, True, "float32"),
    "PP=2 x VPP=2 x TP=2, bf16": (2, 2, 1, 2, False, "bfloat16"),
}


def _batches():
    g = torch.Generator().manual_seed(21)
    out = []
    for length in LENGTHS:
        ids = torch.randint(0, VOCAB, (2, length), generator=g)
        labels = torch.randint(0, VOCAB, (2, length), generator=g)
        out.append((ids, labels, torch.rand(2, length, generator=g) < 0.7))
    return out


def _distill_samples():
    from sdzero_mcore.data.sample import Sample

    g = torch.Generator().manual_seed(8)
    samples = []
    for i in range(4):
        prompt = torch.randint(5, VOCAB, (3 + i,), generator=g).tolist()
        response = torch.randint(5, VOCAB, (5 + 2 * i,), generator=g).tolist()
        prefix = prompt + response + torch.randint(5, VOCAB, (4,), generator=g).tolist()
        samples.append(Sample(i, prompt, response, reward=i % 2, teacher_prefix_ids=prefix))
    return samples


class _Tokenizer:
    pad_token_id = 0


def pp_tp_worker(hf_dir: str, run_dir: str, out_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from sdzero_mcore.checkpoint.loading import build_model_from_hf, build_model_from_mcore
    from sdzero_mcore.config import DistillConfig, OptimizerConfig
    from sdzero_mcore.models.forward import causal_lm_logits, cp_local_batch
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.phases.distill import distill_forward_step, distill_micro_batches, weights_checksum
    from sdzero_mcore.trainer import Trainer, forward_backward

    init_distributed("gloo")
    rank = dist.get_rank()
    batches = _batches()
    probe = batches[1][0]
    dcfg = DistillConfig(prompts_per_step=4, global_batch_size=4, micro_batch_size=2, top_k=8)
    results = {}
    for layout in (REFERENCE, PP_TP, REFERENCE_BF16, *COMBINATIONS.values()):
        tp, pp, cp, vpp, distributed, dtype = layout
        initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  context_parallel_size=cp, virtual_pipeline_model_parallel_size=vpp, seed=3)
        micro = [cp_local_batch(ids, {"labels": labels, "mask": mask}) for ids, labels, mask in batches]
        model = build_model_from_hf(hf_dir, params_dtype=getattr(torch, dtype), transformer_impl="local")
        teacher = build_model_from_hf(hf_dir, params_dtype=getattr(torch, dtype), transformer_impl="local").eval()
        out = results[layout] = {"data_parallel": parallel_state.get_data_parallel_world_size()}
        with torch.no_grad():
            out["logits"] = causal_lm_logits(model, probe)
        out["checksum"] = weights_checksum(model)  # the whole model's, on every rank
        trainer = Trainer(model, OptimizerConfig(lr=1e-2, clip_grad=1.0, distributed=distributed), total_steps=2,
                          run_dir=run_dir, phase=f"tp{tp}pp{pp}cp{cp}vpp{vpp}d{int(distributed)}{dtype}", hf_files_dir=hf_dir)
        out["logs"] = forward_backward(trainer.ddp, micro, ce_forward_step)
        out["grads"] = global_grads(model)
        # a Phase 2 step: teacher top-K (forward-only schedule at PP > 1), the student's KL, the update
        distill_micro = distill_micro_batches(teacher, _distill_samples(), _Tokenizer(), dcfg)
        step = trainer.train_step(distill_micro, distill_forward_step(dcfg))
        out["distill"] = {k: step[k] for k in ("loss", "grad_norm", "num_tokens", "kl_sum_r0", "kl_sum_r1")}
        with torch.no_grad():
            out["logits_after_step"] = causal_lm_logits(model, probe)
        if layout == PP_TP:
            checkpoint = trainer.save_checkpoint()
    initialize_model_parallel(seed=3)
    loaded = build_model_from_mcore(checkpoint, params_dtype=torch.float32, transformer_impl="local")
    with torch.no_grad():
        results["loaded_logits"] = causal_lm_logits(loaded, probe)
    torch.save(results, f"{out_path}.{rank}")
    destroy_distributed()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from sdzero_mcore.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("pp_tp")
    hf_dir = save_tiny_hf_model(root / "hf", "Qwen2ForCausalLM", vocab_size=VOCAB, num_hidden_layers=LAYERS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDZERO_KERNELS_BACKEND", "torch")  # Triton's interpreter is covered by the kernel tests
        run_local_workers(pp_tp_worker, 4, str(hf_dir), str(root / "run"), str(root / "out.pt"))
    return [torch.load(root / f"out.pt.{rank}", weights_only=False) for rank in range(4)]


def _last_stage(results, key, layout=PP_TP):
    values = [r[layout][key] for r in results if r[layout][key] is not None]
    assert len(values) == 4 // layout[1]  # the last stage's ranks, each with the full logits
    assert all(torch.equal(value, values[0]) for value in values)
    return values[0]


def test_logits_loss_and_gradients_equal_pp1_tp1(results):
    ref = results[0][REFERENCE]
    logits = _last_stage(results, "logits")
    assert max_rel(logits, ref["logits"]) < 1e-5
    grads = {}
    for rank_results in results:
        got = rank_results[PP_TP]
        # PP = 1 x TP = 1 ran as DP = 4 on the same batch: four times the tokens, the same token mean
        assert got["logs"]["num_tokens"] * 4 == ref["logs"]["num_tokens"]
        assert got["logs"]["loss"] == pytest.approx(ref["logs"]["loss"], rel=1e-6)
        grads.update(got["grads"])
    assert set(grads) == set(ref["grads"])
    worst = max(max_rel(grads[k], ref["grads"][k]) for k in ref["grads"])
    print(f"PP=2 x TP=2: logits rel {max_rel(logits, ref['logits']):.2e}, max relative grad error {worst:.2e}")
    assert worst < 1e-5


def test_phase2_step_equals_pp1_tp1(results):
    ref = results[0][REFERENCE]["distill"]
    for rank_results in results:
        got = rank_results[PP_TP]["distill"]
        print(f"Phase 2 step: loss {got['loss']:.8f} vs {ref['loss']:.8f}, grad norm {got['grad_norm']:.8f} vs {ref['grad_norm']:.8f}")
        assert got["num_tokens"] == ref["num_tokens"] > 0
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        for r in ("kl_sum_r0", "kl_sum_r1"):
            assert got[r] == pytest.approx(ref[r], rel=1e-5)
    after = _last_stage(results, "logits_after_step")
    assert max_rel(after, results[0][REFERENCE]["logits_after_step"]) < 1e-4  # one Adam step apart from PP=1


def test_checkpoint_written_at_pp2_tp2_loads_at_pp1_tp1(results):
    after = _last_stage(results, "logits_after_step")
    assert max_rel(after, _last_stage(results, "logits")) > 1e-4  # the step changed the weights
    for rank_results in results:
        assert max_rel(rank_results["loaded_logits"], after) < 1e-6


# Relative tolerances against the reference of the same dtype. fp32: other summation orders. bf16
# (8-bit mantissa, 3.9e-3 per rounding; measured: logits 6.8e-3, gradients 2.0e-2, Phase 2 grad norm
# 4.6e-3): other orders of bf16 roundings through four layers. The weights after one step are not
# compared in bf16: Adam's first step is about lr x sign(g) per element, and gradient elements
# below bf16's rounding change sign between summation orders.
TOLERANCES = {
    "float32": {"loss": 1e-6, "distill": 1e-5, "logits": 1e-5, "grads": 1e-5, "after_step": 1e-4},
    "bfloat16": {"loss": 1e-3, "distill": 2e-2, "logits": 2e-2, "grads": 5e-2, "after_step": None},
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_parallelism_combinations_equal_pp1_tp1(results, name):
    layout = COMBINATIONS[name]
    ref = results[0][REFERENCE_BF16 if layout[5] == "bfloat16" else REFERENCE]
    tol = TOLERANCES[layout[5]]
    logits = _last_stage(results, "logits", layout)
    grads = {}
    for rank_results in results:
        got = rank_results[layout]
        # the reference ran as DP = 4 on the same batch: the same token mean over (4 / DP) x the tokens
        assert got["logs"]["num_tokens"] * 4 == ref["logs"]["num_tokens"] * got["data_parallel"]
        assert got["logs"]["loss"] == pytest.approx(ref["logs"]["loss"], rel=tol["loss"])
        grads.update(got["grads"])
        assert got["distill"]["num_tokens"] == ref["distill"]["num_tokens"] > 0
        assert got["distill"]["loss"] == pytest.approx(ref["distill"]["loss"], rel=tol["distill"])
        assert got["distill"]["grad_norm"] == pytest.approx(ref["distill"]["grad_norm"], rel=tol["distill"])
    assert set(grads) == set(ref["grads"])
    # every rank reports the whole model's weight sum (TP shards once, replicas once, all stages)
    assert all(r[layout]["checksum"] == pytest.approx(ref["checksum"], rel=1e-12) for r in results)
    # the distributed optimizer reduce-scatters: a DP rank's gradient buffer is reduced in its own
    # shard only, so the gradients are compared through the grad norm and the step's result
    distributed = layout[4]
    worst = 0.0 if distributed else max(max_rel(grads[k], ref["grads"][k]) for k in ref["grads"])
    after = _last_stage(results, "logits_after_step", layout)
    grad_text = "not compared (sharded)" if distributed else f"{worst:.2e}"
    print(f"{name}: logits rel {max_rel(logits, ref['logits']):.2e}, max relative grad error {grad_text}, "
          f"CE loss {got['logs']['loss']:.8f} vs {ref['logs']['loss']:.8f}, "
          f"Phase 2 loss {got['distill']['loss']:.8f} vs {ref['distill']['loss']:.8f}, grad norm "
          f"{got['distill']['grad_norm']:.8f} vs {ref['distill']['grad_norm']:.8f}, "
          f"logits after the step rel {max_rel(after, ref['logits_after_step']):.2e}")
    assert max_rel(logits, ref["logits"]) < tol["logits"]
    assert worst < tol["grads"]
    if tol["after_step"] is not None:
        assert max_rel(after, ref["logits_after_step"]) < tol["after_step"]  # one Adam step apart from the reference
