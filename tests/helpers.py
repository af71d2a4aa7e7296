"""Shared test helpers: HF reference runs and the worker that runs megatron at several TP sizes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ARCHITECTURES = ["Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "Olmo3ForCausalLM"]
VOCAB = 1111  # not a multiple of 128: padding differs between TP=1 (1152) and TP=2 (1280)
BATCH, SEQ = 2, 24
REPO_ROOT = Path(__file__).resolve().parents[1]


def fixed_inputs(vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    return ids, labels


def hf_reference(hf_dir: Path) -> dict:
    """Logits, mean cross-entropy and its gradients (mapped to global megatron tensors) from transformers."""
    from transformers import AutoModelForCausalLM

    from sdzero_mcore.checkpoint.mapping import concrete_mappings
    from sdzero_mcore.models.hf_config import ModelArch

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids, labels = fixed_inputs()
    logits = model(ids).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    arch = ModelArch.from_hf_dir(hf_dir)
    # A tied lm_head is the embedding parameter itself, so its gradient already holds both uses.
    grads = {name: param.grad for name, param in model.named_parameters()}
    global_grads = {
        m.mcore: hf_to_global(m, grads, arch, padded_vocab=arch.vocab_size) for m in concrete_mappings(arch)
    }
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": global_grads}


def gather_tp(tensor: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return shards


def global_grads(model) -> dict[str, torch.Tensor]:
    """Each parameter's gradient gathered over TP into the global megatron layout, padding stripped
    (a pipeline stage's: its layers under their global names, from each of its model chunks)."""
    from sdzero_mcore.checkpoint.mapping import Kind, gather_shards, model_param_mappings
    from sdzero_mcore.parallel.pipeline import model_chunks

    out = {}
    for chunk in model_chunks(model):
        table = model_param_mappings(chunk)
        for name, param in chunk.named_parameters():
            mapping = table[name]
            full = gather_shards(mapping, gather_tp(param.main_grad))
            if mapping.kind is Kind.VOCAB:
                full = full[: chunk.hf_arch.vocab_size]
            out[mapping.mcore] = full
    return out


def ce_forward_step(model, mb):
    """A forward step of the trainer's contract: megatron's per-token cross-entropy of ``mb``
    (``input_ids``, ``position_ids``, ``labels``), its masked sum over ``mb["mask"]``."""
    from sdzero_mcore.losses.masked import masked_token_sum

    per_token = model(mb["input_ids"], mb["position_ids"], None, labels=mb["labels"])
    return per_token, lambda out: (*masked_token_sum(out, mb["mask"]), {})


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def megatron_run(model) -> dict:
    """Full-vocabulary logits (padding stripped), the mean cross-entropy and global gradients.

    The backward goes through megatron-core's DDP wrapper and ``finalize_model_grads``, as in
    training: that step all-reduces the gradients of parameters that see only their TP rank's
    heads (Qwen3's QK-norm) and averages over data-parallel ranks.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ids, labels = fixed_inputs()
    positions = torch.arange(SEQ).expand(BATCH, -1)
    ddp = DistributedDataParallel(
        config=model.config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model
    )
    with torch.no_grad():
        logits_local = ddp(ids, positions, attention_mask=None)
    logits = torch.cat(gather_tp(logits_local), dim=-1)
    # megatron's own vocab-parallel cross-entropy path, so the backward crosses the TP group.
    loss = ddp(ids, positions, attention_mask=None, labels=labels).mean()
    loss.backward()
    finalize_model_grads([ddp])
    return {
        "logits": logits[..., : model.hf_arch.vocab_size],
        "padded_logits_max": logits[..., model.hf_arch.vocab_size :].max(),
        "loss": loss.detach(),
        "grads": global_grads(model),
    }


def parity_worker(mcore_dir: str, tp_sizes: list[int], out_path: str) -> None:
    """Load the converted checkpoint at each TP size in turn and record what megatron computes, and
    the HF tensors that resharding streams to a rollout engine."""
    import torch.distributed as dist

    from sdzero_mcore.checkpoint.loading import build_model_from_mcore
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.parallel.resharding import iter_hf_tensors

    init_distributed("gloo")
    results = {}
    for tp in tp_sizes:
        initialize_model_parallel(tensor_model_parallel_size=tp)
        model = build_model_from_mcore(mcore_dir, params_dtype=torch.float32, transformer_impl="local")
        resharded = dict(iter_hf_tensors(model))
        results[tp] = megatron_run(model)
        results[tp]["resharded"] = resharded
        results[tp]["padded_vocab_size"] = model.padded_vocab_size
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    destroy_distributed()


def peak_allocated_bytes(fn) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn()`` beyond what was held before.

    Read from the profiler's memory events (every allocation and free of the allocator).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def megatron_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation by a megatron model, recomputing the whole sequence each step (the oracle)."""
    from sdzero_mcore.models.forward import causal_lm_logits

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = causal_lm_logits(model, torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def read_wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file (``run-*.wandb``): a LevelDB-style log of
    protobuf ``Record``s after a 7-byte W&B header, in 32 KiB blocks of (crc, length, type) chunks."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block, pos, records, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full / first
            partial = chunk
        else:  # middle / last
            partial += chunk
        if kind in (1, 4):
            records.append(partial)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def hf_to_global(mapping, hf_tensors: dict, arch, padded_vocab: int) -> torch.Tensor:
    """The global Megatron tensor from full HF tensors (the inverse of mapping.global_to_hf): TP rank 0 of 1."""
    from sdzero_mcore.checkpoint.mapping import DictSource, hf_to_local

    return hf_to_local(mapping, DictSource(hf_tensors), arch, 0, 1, padded_vocab)


def tiny_mcore(root: Path, architecture: str = "Qwen3ForCausalLM") -> Path:
    """A random tiny ``architecture`` model (vocab VOCAB) as a HF directory ``root/hf`` and an mcore
    checkpoint ``root/mcore``."""
    from sdzero_mcore.checkpoint.convert import hf_to_mcore
    from sdzero_mcore.models.tiny import save_tiny_hf_model

    hf_dir = save_tiny_hf_model(root / "hf", architecture, vocab_size=VOCAB)
    hf_to_mcore(hf_dir, root / "mcore", tensor_parallel_size=1, progress=False)
    return root / "mcore"


def tiny_qwen3_mcore(root: Path) -> Path:
    """:func:`tiny_mcore` of a Qwen3."""
    return tiny_mcore(root)


def perturb_like_training(model, rank: int) -> dict[str, bool]:
    """Move a megatron model's weights as training would, so that its checkpoint on disk is stale:
    TP-sharded parameters get a different perturbation per shard; replicated ones (norms) the same
    on every rank, as training keeps them. Returns whether each parameter is TP-sharded."""
    from sdzero_mcore.checkpoint.mapping import Kind, mappings_by_param_name

    table = mappings_by_param_name(model.hf_arch)
    sharded = {name: table[name].kind is not Kind.REPLICATED for name, _ in model.named_parameters()}
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            shard = rank if sharded[name] else 0
            noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(100 * index + shard))
            param.add_(0.02 * noise)
    return sharded


# aten ops that need a tensor's values on the host: on a GPU each one waits for the device to finish
# all queued work. .item() / float() / bool() / tolist() of one element read it through
# _local_scalar_dense; the others make a shape from data (boolean-mask indexing runs nonzero).
_HOST_READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique_consecutive",
                  "_unique2", "unique_dim", "repeat_interleave"}


class _HostReadRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None
        )
        if name in _HOST_READ_OPS or boolean_index:
            self.reads.append(str(func) + (" with a boolean index" if boolean_index else ""))
        return func(*args, **(kwargs or {}))


def host_reads(fn) -> list[str]:
    """The ops of ``fn()`` (backward passes included) that read device data on the host, in order.

    Run on CPU tensors, it lists what would stall the GPU's queue on a GPU: what a hot path must not do."""
    with _HostReadRecorder() as recorder:
        fn()
    return recorder.reads


class _OutputShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # tensors the op creates: an in-place op's output is its input (index_add_ into main_grad)
        self.shapes += [(str(func), tuple(t.shape)) for t in tree_leaves(out)
                        if isinstance(t, torch.Tensor) and not any(t is i for i in inputs)]
        return out


def op_output_shapes(step) -> list[tuple[str, tuple]]:
    """(op, shape) of every tensor ``step()`` creates, forward and backward (a dispatch mode)."""
    with _OutputShapes() as outputs:
        step()
    return outputs.shapes


def wide_tensors(step, width: int) -> tuple[list, list]:
    """(shapes of the tensors saved for backward, (op, shape) of the op outputs) of ``step()``,
    forward and backward, whose last dimension exceeds ``width``: saved-tensor hooks see the
    first, a dispatch mode every op's outputs."""
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _OutputShapes() as outputs:
        step()
    assert saved and outputs.shapes  # the recorders saw the step
    return [s for s in saved if s and s[-1] > width], [(f, s) for f, s in outputs.shapes if s and s[-1] > width]
