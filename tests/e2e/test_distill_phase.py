"""Phase 2 (``sdzero distill``): end to end at TP=1 and TP=2, the loss against a slow reference built
from transformers' full logits, an overfit check, teacher sync, resume, and config errors."""

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, VOCAB

from sdzero_mcore.config import ConfigError, load_config
from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.parallel import run_local_workers

TINY = REPO_ROOT / "examples" / "tiny_cpu.yaml"
FAST = [
    "distill.prompts_per_step=4", "distill.global_batch_size=4", "distill.micro_batch_size=2",
    "rollout.max_new_tokens=16", "distill.max_response_tokens=16", "logging.progress=false",
    "distill.teacher_sync_interval=2", "data.phase1_questions=8", "data.phase2_questions=16",
]


@pytest.fixture(scope="module", autouse=True)
def torch_kernels():
    """The pipeline runs the kernels' PyTorch path: Triton's CPU interpreter (covered by the kernel
    tests) would take minutes here. Spawned ranks inherit the variable."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDZERO_KERNELS_BACKEND", "torch")
        yield


def distill_worker(hf_dir: str, run_dir: str, overrides: list, max_steps: int) -> None:
    from sdzero_mcore.phases.distill import run_distill

    cfg = load_config(TINY, [f"output_dir={run_dir}", *FAST, *overrides])
    run_distill(cfg, hf_dir, max_steps=max_steps)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("d") / "hf", vocab_size=VOCAB)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics" / "distill.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tp2_runs(hf_dir, tmp_path_factory):
    """Phase 2 at TP=2 with each LM head (sparse: the default), three steps each."""
    root = tmp_path_factory.mktemp("tp2")
    for head in ("sparse", "dense"):
        overrides = ["parallel.tensor_model_parallel_size=2", f"distill.lm_head={head}"]
        run_local_workers(distill_worker, 2, str(hf_dir), str(root / head), overrides, 3)
    return root


@pytest.fixture(scope="module")
def hf_dir_4_layers(tmp_path_factory):
    """Four layers: two pipeline stages of two virtual stages hold one layer per chunk."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("d4") / "hf", vocab_size=VOCAB, num_hidden_layers=4)


@pytest.fixture(scope="module")
def pp1_run(hf_dir_4_layers, tmp_path_factory):
    run = tmp_path_factory.mktemp("pp1") / "run"
    run_local_workers(distill_worker, 1, str(hf_dir_4_layers), str(run), [], 3)
    return run


@pytest.fixture(scope="module")
def vpp_run(hf_dir_4_layers, tmp_path_factory):
    run = tmp_path_factory.mktemp("vpp") / "run"
    layout = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"]
    run_local_workers(distill_worker, 2, str(hf_dir_4_layers), str(run), layout, 3)
    return run


@pytest.mark.parametrize("tp,cp,pp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_end_to_end_and_teacher_sync(hf_dir, tmp_path, tp, cp, pp, request):
    if (tp, cp, pp) == (2, 1, 1):
        run = request.getfixturevalue("tp2_runs") / "sparse"
    elif pp == 2:
        run = request.getfixturevalue("vpp_run")
    elif (tp, cp) == (1, 1):
        run = request.getfixturevalue("pp1_run")
    else:
        run = tmp_path / "run"
        layout = [f"parallel.tensor_model_parallel_size={tp}", f"parallel.context_parallel_size={cp}"]
        run_local_workers(distill_worker, tp * cp, str(hf_dir), str(run), layout, 3)
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["kl_per_token"] > 0 and m["response_tokens"] > 0 for m in metrics)
    assert metrics[-1]["generations"] == 12
    # the teacher moves only at the sync (every 2 steps): its weights are constant in between
    sums = [m["teacher_checksum"] for m in metrics]
    assert sums[0] != sums[1] and sums[1] == sums[2]
    assert [m.get("teacher_synced", False) for m in metrics] == [False, True, False]
    final = run / "checkpoints" / "distill" / "step_0000003"
    meta = json.loads((final / "sdzero_checkpoint.json").read_text())
    assert meta["final"] and meta["tensor_parallel_size"] == tp
    assert (final / "teacher" / "sdzero_checkpoint.json").is_file()


def test_pipeline_stages_give_the_pp1_losses_step_by_step(pp1_run, vpp_run):
    """The whole phase at PP=2 x VPP=2 (megatron-core's interleaved schedule; the teacher synced
    from the student's chunks at step 2) against PP=1, both with the sparse head (the default)."""
    pp1, vpp = _metrics(pp1_run), _metrics(vpp_run)
    for a, b in zip(vpp, pp1):
        print(f"step {a['step']}: loss PP=2 x VPP=2 {a['loss']:.10f} PP=1 {b['loss']:.10f}; "
              f"grad_norm {a['grad_norm']:.10f} / {b['grad_norm']:.10f}")
    # teacher_checksum: the whole teacher's weights, summed over the stages (synced at step 2)
    for key in ("loss", "grad_norm", "kl_per_token", "teacher_checksum"):
        assert [m[key] for m in vpp] == pytest.approx([m[key] for m in pp1], rel=1e-5), key
    assert [m["response_tokens"] for m in vpp] == [m["response_tokens"] for m in pp1]


def test_sparse_head_gives_the_dense_losses_step_by_step_at_tp2(tp2_runs):
    """The same rollouts, KL and gradient norm at every step with the LM head applied only at the
    response positions (teacher top-K over vocabulary chunks, student K rows) as with full logits."""
    sparse, dense = _metrics(tp2_runs / "sparse"), _metrics(tp2_runs / "dense")
    assert [m["step"] for m in sparse] == [m["step"] for m in dense] == [1, 2, 3]
    for a, b in zip(sparse, dense):
        print(f"step {a['step']}: kl_per_token sparse {a['kl_per_token']:.8f} dense {b['kl_per_token']:.8f}; "
              f"grad_norm {a['grad_norm']:.8f} / {b['grad_norm']:.8f}")
        assert a["response_tokens"] == b["response_tokens"] > 0 and a["generated_tokens"] == b["generated_tokens"]
        assert a["kl_per_token"] == pytest.approx(b["kl_per_token"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["teacher_checksum"] == pytest.approx(b["teacher_checksum"], rel=1e-6)


def test_resume_continues_with_identical_losses(hf_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_local_workers(distill_worker, 1, str(hf_dir), str(straight), [], 3)
    # "killed" after step 2: checkpoint at step 2, then a fresh process resumes to step 3
    run_local_workers(distill_worker, 1, str(hf_dir), str(resumed), ["checkpoint.save_interval=2"], 2)
    run_local_workers(distill_worker, 1, str(hf_dir), str(resumed), ["checkpoint.resume=true"], 3)
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("kl_per_token", "grad_norm", "teacher_checksum", "generated_tokens", "reward_rate"):
        assert [m[key] for m in a] == [m[key] for m in b], key


def test_bad_configs_fail_before_any_work(hf_dir, tmp_path):
    from sdzero_mcore.data import DataError
    from sdzero_mcore.phases.distill import run_distill

    def cfg(*extra):
        return load_config(TINY, [f"output_dir={tmp_path}/run", *FAST, *extra])

    with pytest.raises(ConfigError, match=r"model.hf_dir: checkpoint .*/nope does not exist"):
        run_distill(cfg(f"model.hf_dir={tmp_path}/nope"))
    with pytest.raises(ConfigError, match=r"parallel.tensor_model_parallel_size: .*3"):
        run_distill(cfg("parallel.tensor_model_parallel_size=3"), str(hf_dir))
    with pytest.raises(DataError, match="missing.jsonl"):
        run_distill(cfg(f"data.dataset={tmp_path}/missing.jsonl"), str(hf_dir))
    with pytest.raises(ConfigError, match=r"distill.max_teacher_tokens \(8\) is smaller than the teacher context"):
        run_distill(cfg("distill.max_teacher_tokens=8"), str(hf_dir))
    assert not (tmp_path / "run").exists()


class RecordingEngine:
    """The real rollout engine, with its turns on the GPU written down."""

    def __init__(self, engine, events: list):
        self.engine, self.events = engine, events

    def __getattr__(self, name):
        method = getattr(self.engine, name)
        if name not in ("wake", "sleep", "generate", "update_weights", "shutdown"):
            return method

        def recorded(*args, **kwargs):
            self.events.append(name)
            return method(*args, **kwargs)

        return recorded


def turns_worker(hf_dir: str, run_dir: str, events_file: str) -> None:
    from sdzero_mcore.phases import on_policy
    from sdzero_mcore.phases.distill import run_distill
    from sdzero_mcore.rollout import colocation, weight_sync

    events = []
    make_engine = weight_sync.make_rollout_engine
    weight_sync.make_rollout_engine = lambda *args, **kwargs: RecordingEngine(make_engine(*args, **kwargs), events)
    on_policy.release_cached_blocks = colocation.release_cached_blocks = lambda: events.append("release cached blocks")
    for method in ("offload", "restore"):
        original = getattr(colocation.TrainStateOffload, method)

        def recorded(self, original=original, method=method):
            if self.offloaded == (method == "offload"):
                return original(self)  # already done: nothing to record
            events.append(method)
            return original(self)

        setattr(colocation.TrainStateOffload, method, recorded)
    # offload on the CPU too: on a GPU it is on by default wherever the engine shares the GPUs
    cfg = load_config(TINY, [f"output_dir={run_dir}", *FAST, "rollout.offload_train_state=true",
                             "distill.validation.interval=2", "distill.validation.questions=2", "distill.validation.k=1"])
    run_distill(cfg, hf_dir, max_steps=2)
    Path(events_file).write_text(json.dumps(events))


def test_engine_and_trainer_take_turns_on_the_gpu(hf_dir, tmp_path):
    """The engine starts, generates and validates with the trainer's optimizer state, masters and
    gradients in host memory and the allocator's cached blocks released; the trainer's state is
    back before any training or weight sync."""
    run_local_workers(turns_worker, 1, str(hf_dir), str(tmp_path / "run"), str(tmp_path / "events.json"))
    events = json.loads((tmp_path / "events.json").read_text())
    turn = ["offload", "release cached blocks", "wake", "generate", "sleep", "restore"]
    assert events == [
        "offload", "release cached blocks", "update_weights", "sleep", "restore",  # the engine starts
        *turn, "update_weights",  # step 1: rollout, training, the new weights into the engine
        *turn, "update_weights",  # step 2
        *turn,  # validation at the last step
        "shutdown",
    ]
    assert len(_metrics(tmp_path / "run")) == 2


# --- the loss on a fixed batch -----------------------------------------------------------------

K = 8


def fixed_batch_worker(student_hf: str, teacher_hf: str, out_path: str) -> None:
    from transformers import AutoTokenizer

    from sdzero_mcore.checkpoint.loading import build_model_from_hf
    from sdzero_mcore.config import OptimizerConfig
    from sdzero_mcore.data.prompts import control_phrases, teacher_context
    from sdzero_mcore.data.sample import Sample
    from sdzero_mcore.losses.distill import collate_distill, distill_loss, student_logits, teacher_targets
    from sdzero_mcore.models.forward import causal_lm_logits
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.phases.distill import sync_teacher
    from sdzero_mcore.trainer import Trainer

    init_distributed("gloo")
    initialize_model_parallel(1, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(student_hf)
    preset = control_phrases("paper")
    g = torch.Generator().manual_seed(3)
    samples, contexts = [], []
    for prompt_len, response_len, reward in ((6, 9, 0), (4, 13, 1)):
        x = torch.randint(3, VOCAB, (prompt_len,), generator=g).tolist()
        y = torch.randint(3, VOCAB, (response_len,), generator=g).tolist()
        ctx = teacher_context(x, y, reward, tokenizer, preset)
        samples.append(Sample(0, x, y, reward, teacher_prefix_ids=ctx.ids[: ctx.response_start]))
        contexts.append((x, y, ctx.ids, ctx.response_start))
    batch = collate_distill(samples, pad_id=0)
    student = build_model_from_hf(student_hf, params_dtype=torch.float32, transformer_impl="local")
    teacher = build_model_from_hf(teacher_hf, params_dtype=torch.float32, transformer_impl="local").eval()
    targets = teacher_targets(teacher, batch, k=K)
    record = {"per_token": distill_loss(student_logits(student, batch), targets).per_token, "contexts": contexts}
    trainer = Trainer(student, OptimizerConfig(lr=3e-3, lr_schedule="constant"), total_steps=12,
                      run_dir=str(Path(out_path).parent / "run"), phase="overfit", hf_files_dir=student_hf)

    def forward_step(model, _):
        def loss_fn(logits):
            loss = distill_loss(logits, targets)
            return loss.loss_sum, loss.num_tokens, {}

        return student_logits(model, batch), loss_fn

    record["overfit"] = [trainer.train_step([None], forward_step)["loss"] for _ in range(12)]
    ids = torch.tensor([contexts[0][2]])
    with torch.no_grad():
        before = (causal_lm_logits(teacher, ids) - causal_lm_logits(student, ids)).abs().max().item()
        sync_teacher(teacher, student)
        after = (causal_lm_logits(teacher, ids) - causal_lm_logits(student, ids)).abs().max().item()
    record["sync"] = (before, after)
    torch.save(record, out_path)
    destroy_distributed()


@pytest.fixture(scope="module")
def fixed(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fixed")
    teacher_hf = save_tiny_hf_model(root / "teacher_hf", vocab_size=VOCAB, seed=1)  # another random init
    run_local_workers(fixed_batch_worker, 1, str(hf_dir), str(teacher_hf), str(root / "record.pt"))
    return torch.load(root / "record.pt", weights_only=False), teacher_hf


def test_loss_equals_slow_full_logit_reference(fixed, hf_dir):
    """Teacher on x + y + P_r + y and student on x + y through transformers in float64: full
    log-softmax, the teacher's top-K, both renormalised over it, reverse KL per response token."""
    from transformers import AutoModelForCausalLM

    record, teacher_hf = fixed
    student = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_hf, dtype=torch.float64).eval()
    worst, checked = 0.0, 0
    for row, (x, y, teacher_ids, response_start) in enumerate(record["contexts"]):
        with torch.no_grad():
            s_logp = torch.log_softmax(student(torch.tensor([x + y])).logits[0], -1)
            t_logp = torch.log_softmax(teacher(torch.tensor([teacher_ids])).logits[0], -1)
        for j in range(len(y)):
            t_top, ids = t_logp[response_start - 1 + j].topk(K)
            s_top = s_logp[len(x) - 1 + j][ids]
            t_top, s_top = t_top - t_top.logsumexp(0), s_top - s_top.logsumexp(0)
            expected = (s_top.exp() * (s_top - t_top)).sum().item()
            got = record["per_token"][row, len(x) - 1 + j].item()
            worst = max(worst, abs(got - expected))
            checked += 1
        # and nothing outside the response
        mask = torch.zeros(record["per_token"].shape[1], dtype=torch.bool)
        mask[len(x) - 1 : len(x) - 1 + len(y)] = True
        assert (record["per_token"][row][~mask] == 0).all()
    print(f"max |per-token loss - slow reference| over {checked} tokens = {worst:.3e}")
    assert checked == 9 + 13 and worst < 1e-5


def test_overfit_on_a_fixed_batch(fixed):
    losses = fixed[0]["overfit"]
    print("phase 2 loss on a fixed batch:", [round(v, 4) for v in losses])
    assert losses[-1] < 0.5 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 9


def test_teacher_sync_makes_teacher_equal_student(fixed):
    before, after = fixed[0]["sync"]
    assert before > 1e-2 and after == 0.0
