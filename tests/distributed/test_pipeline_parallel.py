"""Pipeline parallelism at PP = 2 (two gloo ranks) against the unsplit model, with tied embeddings.

A tiny Qwen3 (tied embeddings, QK-norm, 4 layers: 2 per stage) from a HF directory. In one world:

* ``build_model_from_hf`` at PP = 2 builds only the stage's layers (global layers 1-2 / 3-4), the
  embedding on the first stage only, the final norm on the last, and loads each stage's tensors
  from the HF layers at the stage's offset; the last stage's output layer is the embedding.
* HF -> mcore converted at PP = 2 (two processes, one per stage) loads at PP = 1 bit for bit.
* Logits (on the last stage), the per-token loss over micro-batches of different lengths (the
  stages exchange shapes) and every gradient equal PP = 1; a trainer step's loss and grad norm
  too, and afterwards the tied copies are still equal.
* Resharding at PP = 2 streams exactly the tensors (names, order, values) of the PP = 1 model.
* GRPO's forward-only log-probs of the old policy and the reference at PP = 2, and its update,
  equal PP = 1 (both with the sparse head, the default).
* The sparse LM head at PP = 2 (and below at PP = 2 x VPP = 2): the teacher's top-K through the
  forward-only schedule equals PP = 1's dense one; a Phase 2 forward-backward (the student's KL
  from its last stage's hidden states) gives PP = 1's loss and every gradient, the tied copies'
  after megatron's embedding all-reduce among them.
"""

import pytest
import torch
from helpers import VOCAB, ce_forward_step, max_rel

from sdzero_mcore.parallel import run_local_workers

LAYERS = 4
LENGTHS = (5, 11, 8)  # one sequence per micro-batch: each micro-batch has its own shape


def _batches():
    g = torch.Generator().manual_seed(11)
    out = []
    for length in LENGTHS:
        ids = torch.randint(0, VOCAB, (1, length), generator=g)
        labels = torch.randint(0, VOCAB, (1, length), generator=g)
        mask = torch.rand(1, length, generator=g) < 0.7
        out.append((ids, labels, mask))
    return out


def _grads(model) -> dict:
    """This stage's gradients by global megatron name (the tied output copy under its own name)."""
    from sdzero_mcore.checkpoint.mapping import is_tied_output_copy, model_param_mappings

    table = model_param_mappings(model)
    return {(name if is_tied_output_copy(model, name) else table[name].mcore): param.main_grad.clone()
            for name, param in model.named_parameters()}


def _grpo_samples():
    from sdzero_mcore.data.sample import Sample

    g = torch.Generator().manual_seed(5)
    return [Sample(i, torch.randint(5, VOCAB, (3 + i,), generator=g).tolist(),
                   torch.randint(5, VOCAB, (4 + 2 * i,), generator=g).tolist(), reward=i % 2, advantage=(-1.0) ** i)
            for i in range(4)]


def _distill_samples():
    from sdzero_mcore.data.sample import Sample

    g = torch.Generator().manual_seed(8)
    samples = []
    for i in range(3):
        prompt = torch.randint(5, VOCAB, (3 + i,), generator=g).tolist()
        response = torch.randint(5, VOCAB, (5 + 2 * i,), generator=g).tolist()
        prefix = prompt + response + torch.randint(5, VOCAB, (4 - i,), generator=g).tolist()
        samples.append(Sample(i, prompt, response, reward=i % 2, teacher_prefix_ids=prefix))
    return samples


def distill_case(build, grads_of, run_dir: str, hf_dir: str) -> dict:
    """:func:`_distill_case` with the kernels' PyTorch paths (their Triton ones, in Triton's slow
    CPU interpreter, are tested against them in tests/unit)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDZERO_KERNELS_BACKEND", "torch")
        return _distill_case(build, grads_of, run_dir, hf_dir)


def _distill_case(build, grads_of, run_dir: str, hf_dir: str) -> dict:
    """At this layout: the teacher's top-K (sparse; at PP = 1 dense too) on two micro-batches of
    different shapes, the eval's token KL between a fresh student and the teacher (likewise), and
    one sparse-head Phase 2 forward-backward of the student on the micro-batches: its loss, every
    gradient after ``finalize_model_grads`` (``grads_of``), and the output shape of each of its
    forward steps (the sparse head hands on [T, H] rows from the last stage only)."""
    from sdzero_mcore.checkpoint.source import ModelSource
    from sdzero_mcore.config import DistillConfig, OptimizerConfig, load_config
    from sdzero_mcore.eval.evaluate import token_reverse_kl
    from sdzero_mcore.losses.distill import collate_distill, teacher_targets_for
    from sdzero_mcore.models.tiny import build_char_tokenizer
    from sdzero_mcore.parallel.pipeline import model_chunks, pipeline_parallel_size
    from sdzero_mcore.phases.distill import distill_forward_step
    from sdzero_mcore.run_setup import run_prompts
    from sdzero_mcore.trainer import Trainer, forward_backward

    def sharpened(model, scale: float):
        """Logits of a trained model's scale (the final norm's weight scaled): a random init's are
        near-uniform, and its top-K would be decided by float32 ties."""
        with torch.no_grad():
            for chunk in model_chunks(model):
                if chunk.decoder.final_layernorm is not None:  # the last stage's last chunk
                    chunk.decoder.final_layernorm.weight.mul_(scale)
        return model

    samples = _distill_samples()
    batches = [collate_distill(samples[:2], 0), collate_distill(samples[2:], 0)]
    dcfg = DistillConfig(top_k=8, kl="mixed", mixed_weight=0.3, temperature=0.9)
    heads = ("sparse", "dense") if pipeline_parallel_size() == 1 else ("sparse",)
    teacher = sharpened(build(), 8.0).eval().requires_grad_(False)
    out = {"targets": {head: teacher_targets_for(teacher, batches, k=dcfg.top_k, temperature=dcfg.temperature,
                                                 lm_head=head) for head in heads}}
    student = sharpened(build(), 3.0)
    # the eval's localisation: the student as generator, the teacher as reviser (its P_r phrases
    # from the HF directory's architecture)
    run = run_prompts(load_config(), ModelSource(hf_dir, "hf"), build_char_tokenizer())
    attempts = [{"x_ids": s.prompt_ids, "y_ids": s.response_ids, "reward": s.reward} for s in samples]
    out["eval_kl"] = {head: torch.tensor(sum(token_reverse_kl(student, teacher, attempts, run, lm_head=head), []))
                      for head in heads}
    trainer = Trainer(student, OptimizerConfig(lr=1e-2, clip_grad=0.0), total_steps=1, run_dir=run_dir,
                      phase="distill", hf_files_dir=hf_dir)
    forward_step, out["output_shapes"] = distill_forward_step(dcfg), []

    def recorded_forward_step(model, micro_batch):
        output, loss_fn = forward_step(model, micro_batch)
        out["output_shapes"].append(tuple(output.shape))
        return output, loss_fn

    micro = [(batch, targets, torch.tensor([s.reward for s in chunk]))
             for batch, targets, chunk in zip(batches, out["targets"]["sparse"], (samples[:2], samples[2:]))]
    out["logs"] = forward_backward(trainer.ddp, micro, recorded_forward_step)
    out["grads"] = grads_of(student)
    out["response_tokens"] = [batch.num_response_tokens for batch in batches]
    return out


def check_distill_case(ref: dict, stages: list[dict], layout: str) -> None:
    """``stages``: the pipeline ranks' :func:`_distill_case` (first to last) against PP = 1's ``ref``."""
    assert all(targets is None for stage in stages[:-1] for targets in stage["targets"]["sparse"])
    worst_logprob = worst_logprob_dense = 0.0
    for got, sparse, dense in zip(stages[-1]["targets"]["sparse"], ref["targets"]["sparse"], ref["targets"]["dense"]):
        mask = dense.loss_mask
        assert torch.equal(got.loss_mask, mask) and mask.sum() > 0
        assert torch.equal(got.ids[mask], dense.ids[mask])
        worst_logprob = max(worst_logprob, (got.logprobs[mask] - sparse.logprobs[mask]).abs().max().item())
        # the dense head's within a float32 ulp (the sums of a chunked and of a full row differ)
        worst_logprob_dense = max(worst_logprob_dense, max_rel(got.logprobs[mask], dense.logprobs[mask]))
    assert worst_logprob < 1e-6 and worst_logprob_dense < 1e-6
    # the eval's token KLs, on every stage (the last stage's, broadcast)
    dense_kl = ref["eval_kl"]["dense"]
    assert len(dense_kl) == sum(ref["response_tokens"]) and dense_kl.min() > 0
    worst_kl = max(max_rel(stage["eval_kl"]["sparse"], ref["eval_kl"]["sparse"]) for stage in stages)
    dense_kl_rel = max(max_rel(stage["eval_kl"]["sparse"], dense_kl) for stage in stages)
    assert worst_kl < 1e-6 and dense_kl_rel < 1e-6
    # the student's forward steps: the stage's [s, B, H] activation before the last stage, the
    # response rows [T, H] (not [B, s, V] logits) on it
    # (with virtual stages the last rank's first chunk hands on activations too)
    rows = [shape for shape in stages[-1]["output_shapes"] if len(shape) == 2]
    assert [shape[0] for shape in rows] == ref["response_tokens"] == [shape[0] for shape in ref["output_shapes"]]
    hidden_size = rows[0][1]
    activations = [shape for stage in stages for shape in stage["output_shapes"] if len(shape) != 2]
    assert len(activations) > 0 and all(len(shape) == 3 and shape[-1] == hidden_size for shape in activations)
    assert ref["logs"]["loss"] > 0
    for stage in stages:
        assert stage["logs"]["num_tokens"] * 2 == ref["logs"]["num_tokens"]  # PP = 1 ran as DP = 2
        assert stage["logs"]["loss"] == pytest.approx(ref["logs"]["loss"], rel=1e-6)
    grads = {k: v for stage in stages for k, v in stage["grads"].items()}
    assert set(grads) == set(ref["grads"]) | {"output_layer.weight"}
    worst = max(max_rel(grads[k], ref["grads"][k]) for k in ref["grads"])
    print(f"{layout} sparse head: teacher top-K |logprob - PP=1| {worst_logprob:.1e} (PP=1 dense: relative "
          f"{worst_logprob_dense:.1e}), eval token KL rel "
          f"{worst_kl:.1e} (PP=1 dense {dense_kl_rel:.1e}), Phase 2 loss "
          f"{stages[-1]['logs']['loss']:.8f} vs {ref['logs']['loss']:.8f}, max relative grad error {worst:.2e}")
    assert worst < 1e-5
    # what the optimizer sees: the tied copy on the last stage holds the embedding's whole gradient
    assert torch.equal(grads["output_layer.weight"], grads["embedding.word_embeddings.weight"])


def pipeline_worker(hf_dir: str, mcore_pp2_dir: str, run_dir: str, out_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from safetensors.torch import load_file

    from sdzero_mcore.checkpoint.loading import build_model_from_hf, build_model_from_mcore
    from sdzero_mcore.checkpoint.mapping import DictSource, hf_to_local, model_param_mappings
    from sdzero_mcore.config import GRPOConfig, OptimizerConfig
    from sdzero_mcore.models.forward import causal_lm_logits, cp_local_batch
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.parallel.resharding import iter_hf_tensors
    from sdzero_mcore.phases.grpo import train_on_groups
    from sdzero_mcore.trainer import Trainer, forward_backward

    init_distributed("gloo")
    rank = dist.get_rank()
    hf = load_file(f"{hf_dir}/model.safetensors")
    batches = _batches()
    gcfg = GRPOConfig(updates_per_batch=2, kl_coef=0.1, micro_batch_size=2, entropy_coef=0.01)
    results = {}
    for pp in (1, 2):
        initialize_model_parallel(pipeline_model_parallel_size=pp, seed=3)
        micro = [cp_local_batch(ids, {"labels": labels, "mask": mask}) for ids, labels, mask in batches]
        model = build_model_from_hf(hf_dir, params_dtype=torch.float32, transformer_impl="local")
        out = results[pp] = {}
        if pp == 2:
            # only this stage's layers, loaded from the HF layers at its offset
            out["layer_numbers"] = [layer.layer_number for layer in model.decoder.layers]
            out["names"] = [name for name, _ in model.named_parameters()]
            table = model_param_mappings(model)
            out["max_load_error"] = max(
                (param - hf_to_local(table[name], DictSource(hf), model.hf_arch, 0, 1, model.padded_vocab_size)).abs().max().item()
                for name, param in model.named_parameters())
            out["stage"] = parallel_state.get_pipeline_model_parallel_rank()
        else:
            converted = build_model_from_mcore(mcore_pp2_dir, params_dtype=torch.float32, transformer_impl="local")
            out["converted_equal"] = all(torch.equal(a, b) for a, b in zip(model.parameters(), converted.parameters()))
        out["hf_tensors"] = [(name, tensor.clone()) for name, tensor in iter_hf_tensors(model)]  # some alias the weights
        with torch.no_grad():
            out["logits"] = causal_lm_logits(model, batches[1][0])
        trainer = Trainer(model, OptimizerConfig(lr=1e-2, clip_grad=0.0), total_steps=4,
                          run_dir=f"{run_dir}/pp{pp}", phase="pp", hf_files_dir=hf_dir)
        out["logs"] = forward_backward(trainer.ddp, micro, ce_forward_step)
        out["grads"] = _grads(model)
        step = trainer.train_step(micro, ce_forward_step)
        out["step"] = {k: step[k] for k in ("loss", "grad_norm", "num_tokens")}
        params = dict(model.named_parameters())
        if "output_layer.weight" in params and pp == 2:
            out["tied_copy_after_step"] = params["output_layer.weight"].detach().clone()
        if "embedding.word_embeddings.weight" in params:
            out["embedding_after_step"] = params["embedding.word_embeddings.weight"].detach().clone()
        # GRPO: old-policy and reference log-probs (forward-only schedule at PP = 2), two updates
        reference = build_model_from_hf(hf_dir, params_dtype=torch.float32, transformer_impl="local").eval()
        grpo = train_on_groups(trainer, reference, _grpo_samples(), model.hf_arch.vocab_size, 0, gcfg)
        out["grpo"] = {k: grpo[k] for k in ("loss", "grad_norm", "pg_loss", "kl", "entropy")}
        out["distill"] = distill_case(
            lambda: build_model_from_hf(hf_dir, params_dtype=torch.float32, transformer_impl="local"),
            _grads, f"{run_dir}/pp{pp}_distill", hf_dir)
    torch.save(results, f"{out_path}.{rank}")
    destroy_distributed()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from sdzero_mcore.checkpoint.convert import hf_to_mcore
    from sdzero_mcore.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("pp")
    hf_dir = save_tiny_hf_model(root / "hf", "Qwen3ForCausalLM", vocab_size=VOCAB, num_hidden_layers=LAYERS)
    meta = hf_to_mcore(hf_dir, root / "mcore_pp2", pipeline_parallel_size=2, progress=False)
    assert meta["pipeline_parallel_size"] == 2
    run_local_workers(pipeline_worker, 2, str(hf_dir), str(root / "mcore_pp2"), str(root / "run"), str(root / "out.pt"))
    return [torch.load(root / f"out.pt.{rank}", weights_only=False) for rank in range(2)]


def test_build_model_from_hf_builds_only_the_stage(results):
    first, last = results[0][2], results[1][2]
    assert (first["stage"], last["stage"]) == (0, 1)
    assert first["layer_numbers"] == [1, 2] and last["layer_numbers"] == [3, 4]
    assert "embedding.word_embeddings.weight" in first["names"] and "output_layer.weight" not in first["names"]
    assert "decoder.final_layernorm.weight" not in first["names"]
    assert "embedding.word_embeddings.weight" not in last["names"]
    assert {"decoder.final_layernorm.weight", "output_layer.weight"} <= set(last["names"])
    assert not any(name.startswith("decoder.layers.2.") for name in first["names"] + last["names"])
    # every stage tensor is the HF tensor at its global layer (the tied output layer: the embedding)
    assert first["max_load_error"] == 0.0 and last["max_load_error"] == 0.0


def test_converted_at_pp2_loads_at_pp1(results):
    assert results[0][1]["converted_equal"]


def test_logits_loss_and_gradients_equal_pp1(results):
    ref = results[0][1]
    assert results[0][2]["logits"] is None  # logits live on the last stage
    logits = results[1][2]["logits"]
    assert max_rel(logits, ref["logits"]) < 1e-5
    # PP = 1 ran as DP = 2 on the same batch: twice the tokens, the same token mean
    for rank in range(2):
        logs = results[rank][2]["logs"]
        assert logs["num_tokens"] * 2 == ref["logs"]["num_tokens"]
        assert logs["loss"] == pytest.approx(ref["logs"]["loss"], rel=1e-6)
    grads = {**results[0][2]["grads"], **results[1][2]["grads"]}
    assert set(grads) == set(ref["grads"]) | {"output_layer.weight"}
    worst = max(max_rel(grads[k], ref["grads"][k]) for k in ref["grads"])
    print(f"PP=2 (tied): logits rel {max_rel(logits, ref['logits']):.2e}, max relative grad error {worst:.2e}")
    assert worst < 1e-5
    # the tied copy on the last stage gets the embedding's whole gradient (megatron's embedding all-reduce)
    assert torch.equal(grads["output_layer.weight"], grads["embedding.word_embeddings.weight"])


def test_trainer_step_equals_pp1_and_keeps_tied_copies_equal(results):
    ref = results[0][1]["step"]
    for rank in range(2):
        step = results[rank][2]["step"]
        assert step["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert step["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert torch.equal(results[1][2]["tied_copy_after_step"], results[0][2]["embedding_after_step"])
    assert max_rel(results[0][2]["embedding_after_step"], results[0][1]["embedding_after_step"]) < 1e-5


def test_resharding_streams_the_pp1_weights(results):
    ref = results[0][1]["hf_tensors"]
    for rank in range(2):
        got = results[rank][2]["hf_tensors"]
        assert [name for name, _ in got] == [name for name, _ in ref]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, ref))
    assert "lm_head.weight" not in dict(ref)  # tied: the embedding is the one weight


def test_sparse_head_at_pp2_equals_pp1(results):
    check_distill_case(results[0][1]["distill"], [results[rank][2]["distill"] for rank in range(2)], "PP=2")


def test_grpo_update_equals_pp1(results):
    ref = results[0][1]["grpo"]
    for rank in range(2):
        got = results[rank][2]["grpo"]
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key


# --- virtual (interleaved) pipeline stages: PP = 2 x VPP = 2 -------------------------------------
# One launch, four layouts in turn: PP = 1, PP = 2 x VPP = 2 (each rank two chunks of one layer:
# rank 0 global layers 1 and 3, rank 1 layers 2 and 4), plain PP = 2 (Olmo-3 only), PP = 1 again
# (loading what PP = 2 x VPP = 2 saved); the sparse LM head's Phase 2 case at PP = 1 and
# PP = 2 x VPP = 2 (:func:`_distill_case`). Three micro-batches: the interleaved schedule runs a
# multiple of PP, so the trainer repeats the last one at zero weight.

VPP_LAYOUTS = (("pp1", 1, None), ("vpp", 2, 2), ("pp2", 2, None), ("pp1_load", 1, None))


def _chunk_grads(model) -> dict:
    """:func:`_grads` over the chunks of a model (one chunk without virtual stages)."""
    from sdzero_mcore.parallel.pipeline import model_chunks

    return {name: grad for chunk in model_chunks(model) for name, grad in _grads(chunk).items()}


def _chunk_param(model, name: str):
    """This rank's parameter ``name`` (a GPTModel name) from whichever chunk holds it, else None."""
    from sdzero_mcore.parallel.pipeline import model_chunks

    for chunk in model_chunks(model):
        params = dict(chunk.named_parameters())
        if name in params:
            return params[name].detach().clone()
    return None


def virtual_pipeline_worker(hf_dir: str, olmo_dir: str, run_dir: str, out_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from sdzero_mcore.checkpoint.loading import build_model_from_hf, build_model_from_mcore
    from sdzero_mcore.config import GRPOConfig, OptimizerConfig
    from sdzero_mcore.models.forward import causal_lm_logits, cp_local_batch
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.parallel.pipeline import model_chunks
    from sdzero_mcore.parallel.resharding import iter_hf_tensors
    from sdzero_mcore.phases.grpo import train_on_groups
    from sdzero_mcore.trainer import Trainer, forward_backward

    init_distributed("gloo")
    rank = dist.get_rank()
    batches = _batches()
    ids = batches[1][0]
    gcfg = GRPOConfig(updates_per_batch=2, kl_coef=0.1, micro_batch_size=2, entropy_coef=0.01)
    build = dict(params_dtype=torch.float32, transformer_impl="local")
    results = {}
    for layout, pp, vpp in VPP_LAYOUTS:
        initialize_model_parallel(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp, seed=3)
        out = results[layout] = {}
        with torch.no_grad():
            out["olmo_logits"] = causal_lm_logits(build_model_from_hf(olmo_dir, **build), ids)
        if layout == "pp2":
            continue
        if layout == "pp1_load":  # what PP = 2 x VPP = 2 saved after its step, read at PP = 1
            with torch.no_grad():
                out["logits"] = causal_lm_logits(build_model_from_mcore(results["vpp"]["ckpt"], **build), ids)
            continue
        micro = [cp_local_batch(ids_, {"labels": labels, "mask": mask}) for ids_, labels, mask in batches]
        model = build_model_from_hf(hf_dir, **build)
        out["chunk_layers"] = [[layer.layer_number for layer in chunk.decoder.layers] for chunk in model_chunks(model)]
        out["hf_tensors"] = [(name, tensor.clone()) for name, tensor in iter_hf_tensors(model)]
        with torch.no_grad():
            out["logits"] = causal_lm_logits(model, ids)
        trainer = Trainer(model, OptimizerConfig(lr=1e-2, clip_grad=0.0), total_steps=4,
                          run_dir=f"{run_dir}/{layout}", phase="vpp", hf_files_dir=hf_dir)
        out["logs"] = forward_backward(trainer.ddp, micro, ce_forward_step)
        out["grads"] = _chunk_grads(model)
        step = trainer.train_step(micro, ce_forward_step)
        out["step"] = {k: step[k] for k in ("loss", "grad_norm", "num_tokens")}
        out["embedding_after_step"] = _chunk_param(model, "embedding.word_embeddings.weight")
        out["tied_copy_after_step"] = _chunk_param(model, "output_layer.weight")
        with torch.no_grad():
            out["logits_after_step"] = causal_lm_logits(model, ids)
        out["ckpt"] = str(trainer.save_checkpoint())
        if layout == "vpp":
            with torch.no_grad():  # what PP = 1 saved after its step, read at PP = 2 x VPP = 2
                out["logits_from_pp1"] = causal_lm_logits(build_model_from_mcore(results["pp1"]["ckpt"], **build), ids)
            # resuming: weights, AdamW state and masters into a fresh model at the same layout
            resumed = Trainer(build_model_from_hf(hf_dir, **build), OptimizerConfig(lr=1e-2, clip_grad=0.0),
                              total_steps=4, run_dir=f"{run_dir}/{layout}_resumed", phase="vpp", hf_files_dir=hf_dir)
            resumed.load_checkpoint(trainer.latest_checkpoint())
            out["resumed_equal"] = all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), model.parameters()))
            out["resumed_step"] = resumed.train_step(micro, ce_forward_step)["loss"]
        out["step2"] = trainer.train_step(micro, ce_forward_step)["loss"]
        # GRPO: forward-only log-probs of the old policy and the reference (one micro-batch per
        # update: the interleaved schedule repeats it), two updates
        reference = build_model_from_hf(hf_dir, **build).eval()
        grpo = train_on_groups(trainer, reference, _grpo_samples(), trainer.model.hf_arch.vocab_size, 0, gcfg)
        out["grpo"] = {k: grpo[k] for k in ("loss", "grad_norm", "pg_loss", "kl", "entropy")}
        out["distill"] = distill_case(lambda: build_model_from_hf(hf_dir, **build), _chunk_grads,
                                      f"{run_dir}/{layout}_distill", hf_dir)
        # the distributed optimizer with clipping over both chunks
        sharded = Trainer(build_model_from_hf(hf_dir, **build), OptimizerConfig(lr=1e-2, clip_grad=0.05, distributed=True),
                          total_steps=4, run_dir=f"{run_dir}/{layout}_dist", phase="vpp", hf_files_dir=hf_dir)
        out["dist_step"] = {k: v for k, v in sharded.train_step(micro, ce_forward_step).items() if k in ("loss", "grad_norm")}
        out["dist_embedding_after_step"] = _chunk_param(sharded.model, "embedding.word_embeddings.weight")
        out["vpp_size"] = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    torch.save(results, f"{out_path}.{rank}")
    destroy_distributed()


@pytest.fixture(scope="module")
def vpp_results(tmp_path_factory):
    from sdzero_mcore.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("vpp")
    hf_dir = save_tiny_hf_model(root / "hf", "Qwen3ForCausalLM", vocab_size=VOCAB, num_hidden_layers=LAYERS)
    olmo_dir = save_tiny_hf_model(root / "olmo", "Olmo3ForCausalLM", vocab_size=VOCAB, num_hidden_layers=LAYERS,
                                  layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2))
    run_local_workers(virtual_pipeline_worker, 2, str(hf_dir), str(olmo_dir), str(root / "run"), str(root / "out.pt"))
    return [torch.load(root / f"out.pt.{rank}", weights_only=False) for rank in range(2)]


def test_vpp_chunks_hold_the_interleaved_layers(vpp_results):
    assert vpp_results[0]["vpp"]["vpp_size"] == 2
    assert vpp_results[0]["vpp"]["chunk_layers"] == [[1], [3]]
    assert vpp_results[1]["vpp"]["chunk_layers"] == [[2], [4]]
    assert vpp_results[0]["pp1"]["chunk_layers"] == [[1, 2, 3, 4]]


def test_vpp_logits_loss_and_gradients_equal_pp1(vpp_results):
    ref = vpp_results[0]["pp1"]
    assert vpp_results[0]["vpp"]["logits"] is None  # logits live on the last stage's last chunk
    logits = vpp_results[1]["vpp"]["logits"]
    assert max_rel(logits, ref["logits"]) < 1e-5
    for rank in range(2):
        logs = vpp_results[rank]["vpp"]["logs"]
        assert logs["num_tokens"] * 2 == ref["logs"]["num_tokens"]  # PP = 1 ran as DP = 2: twice the tokens
        assert logs["loss"] == pytest.approx(ref["logs"]["loss"], rel=1e-6)
    grads = {**vpp_results[0]["vpp"]["grads"], **vpp_results[1]["vpp"]["grads"]}
    assert set(grads) == set(ref["grads"]) | {"output_layer.weight"}
    worst = max(max_rel(grads[k], ref["grads"][k]) for k in ref["grads"])
    print(f"PP=2 x VPP=2 (tied): logits rel {max_rel(logits, ref['logits']):.2e}, max relative grad error {worst:.2e}")
    assert worst < 1e-5
    assert torch.equal(grads["output_layer.weight"], grads["embedding.word_embeddings.weight"])


def test_vpp_trainer_steps_equal_pp1(vpp_results):
    ref = vpp_results[0]["pp1"]
    for rank in range(2):
        got = vpp_results[rank]["vpp"]
        assert got["step"]["loss"] == pytest.approx(ref["step"]["loss"], rel=1e-6)
        assert got["step"]["grad_norm"] == pytest.approx(ref["step"]["grad_norm"], rel=1e-5)
        assert got["step2"] == pytest.approx(ref["step2"], rel=1e-5)
        print(f"PP=2 x VPP=2 GRPO (sparse head), rank {rank}: max relative error "
              f"{max(abs(got['grpo'][k] - ref['grpo'][k]) / max(abs(ref['grpo'][k]), 1e-30) for k in ref['grpo']):.1e}")
        for key in ref["grpo"]:
            assert got["grpo"][key] == pytest.approx(ref["grpo"][key], rel=1e-5, abs=1e-7), key
        for key in ("loss", "grad_norm"):
            assert got["dist_step"][key] == pytest.approx(ref["dist_step"][key], rel=1e-5), key
    first, last = vpp_results[0]["vpp"], vpp_results[1]["vpp"]
    assert torch.equal(last["tied_copy_after_step"], first["embedding_after_step"])
    assert max_rel(first["embedding_after_step"], ref["embedding_after_step"]) < 1e-5
    assert max_rel(first["dist_embedding_after_step"], ref["dist_embedding_after_step"]) < 1e-5
    assert max_rel(last["logits_after_step"], ref["logits_after_step"]) < 1e-5


def test_vpp_sparse_head_equals_pp1(vpp_results):
    check_distill_case(vpp_results[0]["pp1"]["distill"], [vpp_results[rank]["vpp"]["distill"] for rank in range(2)],
                       "PP=2 x VPP=2")


def test_vpp_checkpoints_load_at_pp1_and_back_and_resume(vpp_results):
    vpp = vpp_results[1]["vpp"]
    loaded = vpp_results[0]["pp1_load"]["logits"]
    assert torch.equal(loaded, vpp_results[1]["pp1_load"]["logits"])
    print(f"PP=2 x VPP=2 checkpoint at PP=1: logits rel {max_rel(loaded, vpp['logits_after_step']):.2e}")
    assert max_rel(loaded, vpp["logits_after_step"]) < 1e-5
    assert vpp_results[0]["vpp"]["logits_from_pp1"] is None
    from_pp1 = vpp["logits_from_pp1"]
    print(f"PP=1 checkpoint at PP=2 x VPP=2: logits rel {max_rel(from_pp1, vpp_results[0]['pp1']['logits_after_step']):.2e}")
    assert max_rel(from_pp1, vpp_results[0]["pp1"]["logits_after_step"]) < 1e-5
    for rank in range(2):
        got = vpp_results[rank]["vpp"]
        assert got["resumed_equal"]
        assert got["resumed_step"] == got["step2"]  # the same weights, optimizer state and masters


def test_vpp_resharding_streams_the_pp1_weights(vpp_results):
    ref = vpp_results[0]["pp1"]["hf_tensors"]
    for rank in range(2):
        got = vpp_results[rank]["vpp"]["hf_tensors"]
        assert [name for name, _ in got] == [name for name, _ in ref]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, ref))


@pytest.mark.parametrize("layout", ["pp2", "vpp"])
def test_olmo3_pipeline_logits_equal_pp1(vpp_results, layout):
    """Olmo-3's per-layer types (sliding / full window, RoPE per type) go by global layer index."""
    ref = vpp_results[0]["pp1"]["olmo_logits"]
    assert vpp_results[0][layout]["olmo_logits"] is None
    got = vpp_results[1][layout]["olmo_logits"]
    print(f"Olmo-3 {layout}: logits rel {max_rel(got, ref):.2e}")
    assert max_rel(got, ref) < 1e-5
