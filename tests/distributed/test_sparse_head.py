"""The sparse LM head against the dense one (fp32, gloo ranks): teacher top-K, per-token loss and
every parameter's gradient, for each KL x tail and for full_kl, at TP=1, TP=2, CP=2, TP=2 x CP=2;
and with them GRPO's log-prob and entropy head (values and every gradient) and the eval's
token-KL localisation (``token_reverse_kl``), sparse against dense.

Both heads run on the same megatron models in the same layout, and each loss is back-propagated
into every parameter (each rank's own gradients, before any DP x CP reduction: equal there, equal
after it): a Qwen3-shaped student with tied embeddings (every layout) and a Llama-shaped one with
a separate output layer (TP=2 layouts), each against a teacher of another random init, on two
sequences of different prompt, response and teacher-context lengths. The vocabulary (1111,
padded to 1152 or 1280) is streamed in chunks of 256 ids, so chunks end mid-shard and at the
padding. One world of ranks runs every layout of its size and every loss variant.
"""

import json

import pytest
import torch

from sdzero_mcore.parallel import run_local_workers

VOCAB, K, CHUNK, TEMPERATURE = 1111, 8, 256, 0.9
VARIANTS = [(kl, tail) for tail in ("renorm", "bucket") for kl in ("reverse", "forward", "mixed")]
FULL_KL_MODES = ("reverse", "forward", "mixed")
ARCHS = ("Qwen3ForCausalLM", "LlamaForCausalLM")  # tied / untied output weight
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
# the untied output layer where its vocab shards matter (TP = 2); the tied one everywhere
CASES = [(tp, cp, arch) for tp, cp in LAYOUTS for arch in ARCHS if tp == 2 or arch == ARCHS[0]]


def _samples():
    from sdzero_mcore.data.sample import Sample

    generator = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=generator).tolist()

    return [
        Sample(0, prompt_ids=ids(5), response_ids=ids(7), teacher_prefix_ids=ids(17)),
        Sample(1, prompt_ids=ids(3), response_ids=ids(12), teacher_prefix_ids=ids(9)),
    ]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _teacher_rows_for_student(teacher, batch, rows):
    """The teacher's final-norm hidden states and vocab-parallel logits at the positions whose
    predictions pair with this rank's student response ``rows`` (flat indices into [B, s_local])."""
    from sdzero_mcore.models.forward import (
        cp_local_batch,
        cp_size_rank,
        final_hidden_states,
        vocab_parallel_logits,
    )
    from sdzero_mcore.parallel.context_parallel import gather_from_cp, padded_seq_len, split_for_cp

    cp_size, cp_rank = cp_size_rank()
    local = cp_local_batch(batch.teacher_ids)
    hidden = gather_from_cp(final_hidden_states(teacher, local).transpose(0, 1).contiguous(), dim=1)
    logits = gather_from_cp(vocab_parallel_logits(teacher, local), dim=1)
    batch_size, student_len = batch.student_ids.shape
    positions = torch.arange(padded_seq_len(student_len, cp_size)).expand(batch_size, -1)
    local_positions = split_for_cp(positions, cp_size, cp_rank, dim=1)
    row = rows // local_positions.shape[1]
    local_positions = local_positions.reshape(-1)[rows]
    teacher_positions = local_positions + (batch.teacher_start - batch.student_start)[row]
    return hidden[row, teacher_positions], logits[row, teacher_positions]


def _worker(layouts: list, out_path: str) -> None:
    import os

    import torch.distributed as dist
    from helpers import gather_tp
    from megatron.core import parallel_state
    from sdzero_kernels import full_kl, full_kl_reference, fused_linear_full_kl, topk_kl_reference

    from sdzero_mcore.checkpoint.source import ModelSource
    from sdzero_mcore.config import load_config
    from sdzero_mcore.eval.evaluate import token_reverse_kl
    from sdzero_mcore.losses import (
        collate_distill,
        distill_loss,
        sparse_distill_loss,
        student_response_hidden,
        teacher_targets,
    )
    from sdzero_mcore.models.builder import build_gpt_model
    from sdzero_mcore.models.forward import (
        cp_local_batch,
        cp_size_rank,
        final_hidden_states,
        gpt_model,
        output_weight,
        real_vocab_size,
    )
    from sdzero_mcore.losses.policy import sparse_logprobs_entropy, vocab_parallel_logprobs_entropy
    from sdzero_mcore.models.hf_config import ModelArch
    from sdzero_mcore.models.tiny import build_char_tokenizer, tiny_hf_config
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.parallel.context_parallel import split_for_cp
    from sdzero_mcore.run_setup import run_prompts

    os.environ["SDZERO_KERNELS_BACKEND"] = "torch"  # the Triton paths: tests/unit/test_fused_head.py
    init_distributed("gloo")
    batch = collate_distill(_samples(), pad_id=0)
    # GRPO's labels on the student's sequences: the next token (the response rows predict y)
    labels = torch.cat([batch.student_ids[:, 1:], torch.zeros_like(batch.student_ids[:, :1])], dim=1)
    # the eval's reviser context around each response (its P_r phrases from the config.json's architecture)
    model_dir = os.path.dirname(out_path)
    run = run_prompts(load_config(), ModelSource(model_dir, "hf"), build_char_tokenizer())
    attempts = [{"x_ids": s.prompt_ids, "y_ids": s.response_ids, "reward": reward}
                for s, reward in zip(_samples(), (0, 1))]
    results = {}

    def worst_over_ranks(value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    for tp, cp in layouts:
        initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for arch_name in [arch for t, c, arch in CASES if (t, c) == (tp, cp)]:
            arch = ModelArch.from_hf_config(tiny_hf_config(arch_name, vocab_size=VOCAB).to_dict())
            torch.manual_seed(0)
            student = build_gpt_model(arch, transformer_impl="local", on_cpu=True)
            torch.manual_seed(1)
            teacher = build_gpt_model(arch, transformer_impl="local", on_cpu=True).eval().requires_grad_(False)
            with torch.no_grad():  # logits of a trained model's scale: a random init's are near-uniform, its
                # KLs ~1e-3 and at the float32 noise floor of the logits themselves
                student.decoder.final_layernorm.weight.mul_(3.0)
                teacher.decoder.final_layernorm.weight.mul_(8.0)
            params = dict(student.named_parameters())
            record = {"tied": student.share_embeddings_and_output_weights, "params": sorted(params)}

            dense_targets = teacher_targets(teacher, batch, k=K, temperature=TEMPERATURE)
            sparse_targets = teacher_targets(teacher, batch, k=K, temperature=TEMPERATURE, lm_head="sparse",
                                             vocab_chunk=CHUNK)
            mask = dense_targets.loss_mask
            record["targets_mask_equal"] = torch.equal(sparse_targets.loss_mask, mask)
            record["targets_ids_equal"] = worst_over_ranks(
                float(not torch.equal(sparse_targets.ids[mask], dense_targets.ids[mask]))) == 0.0
            record["targets_logprob_err"] = worst_over_ranks(
                (sparse_targets.logprobs[mask] - dense_targets.logprobs[mask]).abs().max().item())
            record["response_tokens"] = int(mask.sum())

            # One student forward serves both heads: the dense logits are the model's own output layer
            # on the final hidden states (what GPTModel.forward computes), the sparse head reads the
            # hidden states at the response rows. Each loss is back-propagated into every parameter.
            hidden_rows, head = student_response_hidden(student, batch)
            rows = head.rows
            hidden = final_hidden_states(student, cp_local_batch(batch.student_ids))
            logits = gpt_model(student).output_layer(hidden, weight=head.weight if record["tied"] else None,
                                      runtime_gather_output=False)[0].transpose(0, 1)
            logit_rows = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
            # the float64 oracle on the dense path's float32 logits (gathered over TP), real ids only
            oracle_logits = torch.cat(gather_tp(logit_rows.detach()), dim=-1)[:, :VOCAB].double()

            def grads_of(loss):
                names = [name for name, p in params.items() if p.requires_grad]
                grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True, allow_unused=True)
                return {n: g for n, g in zip(names, grads) if g is not None}

            def compare(name, dense_sum, dense_rows, sparse_sum, sparse_rows, oracle):
                dense_grads, sparse_grads = grads_of(dense_sum), grads_of(sparse_sum)
                assert dense_grads.keys() == sparse_grads.keys()
                record[name] = {
                    "loss": (dense_sum.item(), sparse_sum.item()),
                    "per_token_rel": worst_over_ranks(_max_rel(sparse_rows.detach(), dense_rows.detach())),
                    "sparse_oracle_rel": worst_over_ranks(_max_rel(sparse_rows.detach(), oracle)),
                    "dense_oracle_rel": worst_over_ranks(_max_rel(dense_rows.detach(), oracle)),
                    "grad_rel": {key: worst_over_ranks(_max_rel(sparse_grads[key], dense_grads[key]))
                                 for key in dense_grads},
                }

            def at_rows(full):  # a [B, S_pad, ...] target at this rank's response rows
                local = split_for_cp(full, *cp_size_rank(), dim=1)
                return local.reshape(-1, *local.shape[2:]).index_select(0, rows)

            # the student heads on the same (dense) targets: the teacher's own float32 rounding
            # (1 ulp of a log-prob, checked above) moves a bucket loss whose tail mass is small
            for kl, tail in VARIANTS:
                options = dict(kl=kl, tail=tail, mixed_weight=0.3, temperature=TEMPERATURE)
                dense = distill_loss(logits, dense_targets, **options)
                sparse = sparse_distill_loss(hidden_rows, head, dense_targets, vocab_chunk=CHUNK, **options)
                assert dense.num_tokens == sparse.num_tokens == len(rows)
                oracle = topk_kl_reference(oracle_logits, at_rows(dense_targets.logprobs), at_rows(dense_targets.ids),
                                           **options)
                compare(f"{kl}_{tail}", dense.loss_sum, dense.per_token.reshape(-1)[rows], sparse.loss_sum,
                        sparse.per_token.reshape(-1)[rows], oracle)

            # full_kl: the teacher's whole distribution at the same response positions
            teacher_hidden, teacher_logits = _teacher_rows_for_student(teacher, batch, rows)
            oracle_teacher = torch.cat(gather_tp(teacher_logits), dim=-1)[:, :VOCAB]
            for kl in FULL_KL_MODES:
                options = dict(kl=kl, mixed_weight=0.3, temperature=TEMPERATURE)
                dense = full_kl(logit_rows, teacher_logits, tp_group=tp_group, **options)
                sparse = fused_linear_full_kl(hidden_rows, head.weight, teacher_hidden, output_weight(teacher),
                                              tp_group=tp_group, vocab_size=real_vocab_size(student),
                                              vocab_chunk=CHUNK, **options)
                compare(f"full_{kl}", dense.sum(), dense.detach(), sparse.sum(), sparse.detach(),
                        full_kl_reference(oracle_logits, oracle_teacher, **options))

            # GRPO: the sampled token's log-prob and the entropy at the response rows, each output
            # weighted, into every parameter
            local_labels = cp_local_batch(batch.student_ids, {"labels": labels})["labels"]
            dense_lp, dense_ent = vocab_parallel_logprobs_entropy(logits, local_labels, tp_group, VOCAB)
            sparse_lp, sparse_ent = sparse_logprobs_entropy(hidden_rows, head, local_labels, tp_group,
                                                            vocab_chunk=CHUNK)
            dense_lp, dense_ent = dense_lp.reshape(-1)[rows], dense_ent.reshape(-1)[rows]
            sparse_lp, sparse_ent = sparse_lp.reshape(-1)[rows], sparse_ent.reshape(-1)[rows]
            weights = torch.linspace(-1.0, 2.0, len(rows))
            dense_grads = grads_of((dense_lp * weights + dense_ent * weights.flip(0)).sum())
            sparse_grads = grads_of((sparse_lp * weights + sparse_ent * weights.flip(0)).sum())
            record["grpo"] = {
                "logprob_rel": worst_over_ranks(_max_rel(sparse_lp.detach(), dense_lp.detach())),
                "entropy_rel": worst_over_ranks(_max_rel(sparse_ent.detach(), dense_ent.detach())),
                "grad_rel": {key: worst_over_ranks(_max_rel(sparse_grads[key], dense_grads[key]))
                             for key in dense_grads},
            }
            # the eval's localisation: the student as generator, the teacher as reviser
            dense_kl = sum(token_reverse_kl(student, teacher, attempts, run, lm_head="dense"), [])
            sparse_kl = sum(token_reverse_kl(student, teacher, attempts, run, lm_head="sparse"), [])
            record["eval_kl"] = {"tokens": len(sparse_kl), "min": min(dense_kl), "rel": worst_over_ranks(
                _max_rel(torch.tensor(sparse_kl), torch.tensor(dense_kl)))}
            results[(tp, cp, arch_name)] = record
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    destroy_distributed()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse_head")
    (root / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))  # the eval's prompts
    run_local_workers(_worker, 2, [(1, 1), (2, 1), (1, 2)], str(root / "two.pt"))
    run_local_workers(_worker, 4, [(2, 2)], str(root / "four.pt"))
    return {**torch.load(root / "two.pt"), **torch.load(root / "four.pt")}


@pytest.mark.parametrize("tp,cp,arch", CASES)
def test_teacher_top_k_is_the_dense_one(results, tp, cp, arch):
    record = results[(tp, cp, arch)]
    print(f"TP={tp} CP={cp} {arch}: max |logprob sparse - dense| = {record['targets_logprob_err']:.2e}")
    assert record["response_tokens"] == 7 + 12
    assert record["targets_mask_equal"] and record["targets_ids_equal"]
    assert record["targets_logprob_err"] < 1e-6


@pytest.mark.parametrize("tp,cp,arch", CASES)
def test_student_loss_and_every_gradient_are_the_dense_ones(results, tp, cp, arch):
    record = results[(tp, cp, arch)]
    assert record["tied"] == (arch == "Qwen3ForCausalLM")
    names = [f"{kl}_{tail}" for kl, tail in VARIANTS] + [f"full_{kl}" for kl in FULL_KL_MODES]
    for name in names:
        entry = record[name]
        dense_loss, sparse_loss = entry["loss"]
        worst_grad = max(entry["grad_rel"].values())
        print(f"TP={tp} CP={cp} {arch} {name}: loss {dense_loss:.6f} / {sparse_loss:.6f}; per-token rel: sparse-dense "
              f"{entry['per_token_rel']:.1e}, sparse-oracle {entry['sparse_oracle_rel']:.1e}, dense-oracle "
              f"{entry['dense_oracle_rel']:.1e}; worst grad rel {worst_grad:.1e}")
        assert dense_loss > 0 and abs(sparse_loss - dense_loss) <= 1e-6 * dense_loss, name
        assert entry["per_token_rel"] < 1e-6, name
        # and within 1e-6 of the float64 value on the same float32 logits
        assert entry["sparse_oracle_rel"] < 1e-6, name
        grads = entry["grad_rel"]
        # every parameter, the embedding (tied: both uses) and the output layer among them
        assert sorted(grads) == record["params"], name
        assert "embedding.word_embeddings.weight" in grads and ("output_layer.weight" in grads) != record["tied"]
        assert all(err < 1e-5 for err in grads.values()), (name, {k: v for k, v in grads.items() if v >= 1e-5})


@pytest.mark.parametrize("tp,cp,arch", CASES)
def test_grpo_head_and_every_gradient_are_the_dense_ones(results, tp, cp, arch):
    record = results[(tp, cp, arch)]["grpo"]
    grads = record["grad_rel"]
    print(f"TP={tp} CP={cp} {arch} GRPO head: logprob rel {record['logprob_rel']:.1e}, entropy rel "
          f"{record['entropy_rel']:.1e}, worst grad rel {max(grads.values()):.1e}")
    assert record["logprob_rel"] < 1e-6 and record["entropy_rel"] < 1e-6
    assert sorted(grads) == results[(tp, cp, arch)]["params"]  # every parameter, the tied embedding among them
    assert all(err < 1e-5 for err in grads.values()), {k: v for k, v in grads.items() if v >= 1e-5}


@pytest.mark.parametrize("tp,cp,arch", CASES)
def test_eval_localisation_is_the_dense_one(results, tp, cp, arch):
    record = results[(tp, cp, arch)]["eval_kl"]
    print(f"TP={tp} CP={cp} {arch} eval token KL: sparse vs dense rel {record['rel']:.1e}")
    assert record["tokens"] == 7 + 12 and record["min"] > 0
    assert record["rel"] < 1e-6
