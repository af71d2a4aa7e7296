"""GRPO's and the eval's sparse LM head against the dense one (fp32, one rank; TP = 2 and CP = 2:
tests/distributed/test_sparse_head.py).

* ``fused_linear_logprobs_entropy`` against its float64 reference and against
  ``vocab_parallel_logprobs_entropy`` on the same logits, values and gradients, with megatron's
  vocabulary padding and chunks that end mid-vocabulary;
* on a megatron model with a tied embedding, two sequences of different lengths: the sparse head's
  per-token log-probs and entropies and every parameter's gradient against the dense head's;
  a GRPO update (old and reference log-prob passes, two optimizer steps) with ``grpo.lm_head``
  sparse and dense; and no tensor wider than the vocabulary chunk in a sparse GRPO micro-step;
* the eval's token-KL localisation (``eval.lm_head``) sparse against dense.
"""

import json

import pytest
import torch
from helpers import host_reads, wide_tensors
from sdzero_kernels import fused_linear_logprobs_entropy, fused_linear_logprobs_entropy_reference

from sdzero_mcore.checkpoint.source import ModelSource
from sdzero_mcore.config import GRPOConfig, OptimizerConfig, load_config
from sdzero_mcore.data.sample import Sample
from sdzero_mcore.eval.evaluate import token_reverse_kl
from sdzero_mcore.losses.distill import local_response_rows, response_hidden
from sdzero_mcore.losses.policy import grpo_loss, sparse_logprobs_entropy, vocab_parallel_logprobs_entropy
from sdzero_mcore.models.builder import build_gpt_model
from sdzero_mcore.models.forward import cp_local_batch
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.models.tiny import build_char_tokenizer, tiny_hf_config
from sdzero_mcore.phases.grpo import collate_policy, train_on_groups
from sdzero_mcore.run_setup import run_prompts
from sdzero_mcore.trainer import Trainer

T, H, V, REAL, CHUNK = 11, 24, 320, 301, 96  # chunks of 96 over 301 real ids: 96, 96, 96, 13
VOCAB, MODEL_CHUNK = 1111, 320  # the model's: above every other width of the tiny model, below the vocabulary


def _rel(ours, ref) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def _inputs(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=generator).to(dtype)
    weight = (torch.randn(V, H, generator=generator) * 0.6).to(dtype)
    labels = torch.randint(0, REAL, (T,), generator=generator)
    return hidden, weight, labels


def _values_and_grads(fn, hidden, weight):
    """(logprobs, entropy) and d/d(hidden, weight) of a weighted sum of both (every output gets a gradient)."""
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logprobs, entropy = fn(hidden, weight)
    weights = torch.linspace(-1.0, 2.0, T)
    loss = (logprobs * weights).sum() + (entropy * weights.flip(0)).sum()
    return logprobs.detach(), entropy.detach(), torch.autograd.grad(loss, [hidden, weight])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kernel_is_its_reference_and_the_dense_op(temperature):
    hidden, weight, labels = _inputs()
    ours = _values_and_grads(lambda h, w: fused_linear_logprobs_entropy(
        h, w, labels, temperature=temperature, vocab_size=REAL, vocab_chunk=CHUNK), hidden, weight)
    reference = _values_and_grads(lambda h, w: fused_linear_logprobs_entropy_reference(
        h, w, labels, temperature=temperature, vocab_size=REAL), hidden, weight)
    # the dense op on the float32 logits (it takes the padding out of the softmax itself)
    dense = _values_and_grads(lambda h, w: vocab_parallel_logprobs_entropy(
        (h @ w.t()) / temperature, labels, vocab_size=REAL), hidden, weight)
    for name, other in (("reference", reference), ("dense", dense)):
        assert _rel(ours[0], other[0]) < 1e-6 and _rel(ours[1], other[1]) < 1e-6, name
        assert _rel(ours[2][0], other[2][0]) < 1e-5 and _rel(ours[2][1], other[2][1]) < 1e-5, name
    assert ours[2][1][REAL:].abs().max() == 0  # the padding rows get no gradient


def test_kernel_in_bfloat16_follows_the_reference():
    hidden, weight, labels = _inputs(torch.bfloat16, seed=1)
    logprobs, entropy = fused_linear_logprobs_entropy(hidden, weight, labels, vocab_size=REAL, vocab_chunk=CHUNK)
    ref_logprobs, ref_entropy = fused_linear_logprobs_entropy_reference(hidden, weight, labels, vocab_size=REAL)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert _rel(logprobs, ref_logprobs) < 2e-2 and _rel(entropy, ref_entropy) < 2e-2


def test_kernel_names_bad_arguments():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match=r"labels must be \[T\]"):
        fused_linear_logprobs_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="labels must be int64 or int32"):
        fused_linear_logprobs_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="vocab_chunk must be a positive int"):
        fused_linear_logprobs_entropy(hidden, weight, labels, vocab_chunk=0)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        fused_linear_logprobs_entropy(hidden, weight, labels, temperature=0.0)


# ------------------------------------------------------------------------------------------
# On a megatron model


def _model(seed: int, norm_scale: float):
    arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM", vocab_size=VOCAB).to_dict())
    torch.manual_seed(seed)
    model = build_gpt_model(arch, transformer_impl="local", on_cpu=True)
    with torch.no_grad():  # logits of a trained model's scale (a random init's are near-uniform)
        model.decoder.final_layernorm.weight.mul_(norm_scale)
    return model


def _samples():
    generator = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=generator).tolist()

    return [Sample(0, ids(5), ids(7), reward=1, advantage=1.0), Sample(1, ids(3), ids(12), reward=0, advantage=-1.0),
            Sample(2, ids(4), ids(9), reward=1, advantage=0.5), Sample(3, ids(6), ids(3), reward=0, advantage=-0.5)]


def _micro_batch(samples):
    """What train_on_groups prepares for the sparse head: the collated batch and its response rows."""
    batch = collate_policy(samples, pad_id=0)
    mb = cp_local_batch(batch["input_ids"], {k: batch[k] for k in ("labels", "mask")})
    mb["advantages"] = batch["advantages"]
    mb["response_rows"] = local_response_rows(torch.tensor([len(s.prompt_ids) for s in samples]),
                                              torch.tensor([len(s.response_ids) for s in samples]),
                                              batch["input_ids"].shape[1])
    return mb


@pytest.fixture(scope="module")
def policy(megatron_single_rank):
    model = _model(0, 3.0)
    assert model.share_embeddings_and_output_weights
    return model


def test_sparse_head_is_the_dense_one_with_every_gradient(policy):
    mb = _micro_batch(_samples()[:2])
    mask = mb["mask"]
    params = dict(policy.named_parameters())
    weights = torch.linspace(-1.0, 2.0, mask.numel()).view(mask.shape)

    def run(head):
        if head == "dense":
            logits = policy(mb["input_ids"], mb["position_ids"], None)
            logprobs, entropy = vocab_parallel_logprobs_entropy(logits, mb["labels"], vocab_size=VOCAB)
        else:
            hidden, lm_head = response_hidden(policy, mb, *mb["response_rows"])
            logprobs, entropy = sparse_logprobs_entropy(hidden, lm_head, mb["labels"], vocab_chunk=MODEL_CHUNK)
        loss = torch.where(mask, logprobs * weights + entropy * weights.flip(1), 0.0).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        return logprobs[mask].detach(), entropy[mask].detach(), dict(zip(params, grads))

    dense, sparse = run("dense"), run("sparse")
    assert mask.sum() == 7 + 12
    print(f"logprob rel {_rel(sparse[0], dense[0]):.1e}, entropy rel {_rel(sparse[1], dense[1]):.1e}, "
          f"worst grad rel {max(_rel(sparse[2][n], dense[2][n]) for n in params):.1e}")
    assert _rel(sparse[0], dense[0]) < 1e-6 and _rel(sparse[1], dense[1]) < 1e-6
    assert "embedding.word_embeddings.weight" in params  # tied: both of its uses in one gradient
    for name in params:
        assert _rel(sparse[2][name], dense[2][name]) < 1e-5, name


def test_grpo_update_is_the_dense_one(megatron_single_rank, tmp_path):
    """Two optimizer steps of ``train_on_groups`` (old-policy and reference log-prob passes, KL and
    entropy terms) with ``grpo.lm_head`` sparse and dense, from the same weights: the metrics of
    both updates, the second's taken after the first step. (Not the weights after them: Adam's
    first step moves every weight by about lr whatever the size of its gradient, so parameters
    whose gradient is float32 noise move apart by up to 2 lr.)"""
    reference = _model(1, 3.0).eval().requires_grad_(False)
    results = {}
    for head in ("dense", "sparse"):
        model = _model(0, 3.0)
        trainer = Trainer(model, OptimizerConfig(lr=1e-2, clip_grad=0.0), total_steps=2, run_dir=tmp_path / head,
                          phase="grpo", hf_files_dir=tmp_path)
        gcfg = GRPOConfig(updates_per_batch=2, kl_coef=0.1, entropy_coef=0.01, micro_batch_size=1, lm_head=head)
        metrics = train_on_groups(trainer, reference, _samples(), VOCAB, 0, gcfg)
        results[head] = metrics
    dense, sparse = results["dense"], results["sparse"]
    for key in ("loss", "grad_norm", "pg_loss", "kl", "entropy"):
        print(f"{key}: dense {dense[key]:.8g} sparse {sparse[key]:.8g}")
        assert sparse[key] == pytest.approx(dense[key], rel=1e-5, abs=1e-7), key
    assert dense["kl"] > 0  # the second update's policy has moved away from the reference


def test_sparse_grpo_step_holds_no_vocabulary_wide_tensor(policy):
    arch = policy.hf_arch
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    assert max(arch.hidden_size, 2 * arch.ffn_hidden_size, qkv) < MODEL_CHUNK < VOCAB
    mb = _micro_batch(_samples())

    def step(head):
        def run():
            if head == "sparse":
                hidden, lm_head = response_hidden(policy, mb, *mb["response_rows"])
                logprobs, entropy = sparse_logprobs_entropy(hidden, lm_head, mb["labels"], vocab_chunk=MODEL_CHUNK)
            else:
                logits = policy(mb["input_ids"], mb["position_ids"], None)
                logprobs, entropy = vocab_parallel_logprobs_entropy(logits, mb["labels"], vocab_size=VOCAB)
            loss = grpo_loss(logprobs, logprobs.detach(), mb["advantages"], mb["mask"], entropy=entropy,
                             entropy_coef=0.01)
            loss.objective.backward()
        return run

    saved, outputs = wide_tensors(step("sparse"), MODEL_CHUNK)
    assert saved == [] and outputs == [], (saved, outputs[:5])
    saved, outputs = wide_tensors(step("dense"), MODEL_CHUNK)  # the recorder can fail
    assert any(shape[-1] == policy.padded_vocab_size for shape in saved)
    policy.zero_grad(set_to_none=True)


def test_sparse_grpo_loss_reads_nothing_on_the_host(policy):
    """The sparse head's loss function, forward and backward, never waits for the device (its rows
    were computed on the host when the micro-batch was prepared)."""
    mb = _micro_batch(_samples())
    hidden, lm_head = response_hidden(policy, mb, *mb["response_rows"])

    def loss_step():
        logprobs, entropy = sparse_logprobs_entropy(hidden, lm_head, mb["labels"], vocab_chunk=MODEL_CHUNK)
        loss = grpo_loss(logprobs, logprobs.detach(), mb["advantages"], mb["mask"], entropy=entropy,
                         entropy_coef=0.01, num_tokens=1)
        loss.objective.backward()

    assert host_reads(loss_step) == []
    policy.zero_grad(set_to_none=True)


def test_eval_localisation_is_the_dense_one(policy, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    run = run_prompts(load_config(), ModelSource(tmp_path, "hf"), build_char_tokenizer())
    reviser = _model(1, 8.0).eval()
    attempts = [{"x_ids": s.prompt_ids, "y_ids": s.response_ids, "reward": s.reward} for s in _samples()[:3]]
    dense = token_reverse_kl(policy, reviser, attempts, run, lm_head="dense")
    sparse = token_reverse_kl(policy, reviser, attempts, run, lm_head="sparse")
    assert [len(k) for k in sparse] == [len(k) for k in dense] == [7, 12, 9]
    dense_flat, sparse_flat = torch.tensor(sum(dense, [])), torch.tensor(sum(sparse, []))
    print(f"mean KL {dense_flat.mean():.4f}; sparse vs dense rel {_rel(sparse_flat, dense_flat):.1e}")
    assert dense_flat.min() > 0 and _rel(sparse_flat, dense_flat) < 1e-6
