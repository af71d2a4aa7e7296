"""Golden prompts: every phase's context under both recipes, decoded character for character.

The tokenizer is a ChatML one (Qwen's special tokens and chat template) over single characters,
so decoding is exact and the expected strings below are the layouts the release writes
(docs/method.md, "Prompts"), not something derived from the code under test.
"""

import json

import pytest

from sdzero_mcore.config import ConfigError, load_config
from sdzero_mcore.data.prompts import P_R_PRESETS, RunPrompts, control_phrases_from_config
from sdzero_mcore.models.tiny import build_char_tokenizer
from sdzero_mcore.run_setup import config_architecture, run_prompts
from sdzero_mcore.checkpoint.source import ModelSource

QUESTION = "What is 2+3?"
Y_INIT = "2+3=6\n\\boxed{6}"
Y_REV = "2+3=5\n\\boxed{5}"
STEP = "Please reason step by step, and put your final answer within \\boxed{}."
SYSTEM_COLLECT = "You are a helpful assistant that solves math problems step by step."
QWEN_WRONG = "Wait, this response is wrong. Let me correct it."
PAPER_WRONG = "Wait, this response is not correct, let me start over."
END = "<|im_end|>"


def chat(user, system=None):
    head = f"<|im_start|>system\n{system}{END}\n" if system else ""
    return f"{head}<|im_start|>user\n{user}{END}\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def prompts_for(tokenizer, recipe, *overrides, preset="qwen"):
    cfg = load_config(overrides=[f"recipe={recipe}", *overrides])
    # `auto` needs a model; the architecture tests below cover it
    architecture = "Qwen3ForCausalLM" if cfg.data.p_r_preset == "auto" else None
    return RunPrompts.from_config(cfg, tokenizer, architecture)


def ids(tokenizer, text, end=False):
    return tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if end else [])


def decode(tokenizer, token_ids):
    return tokenizer.decode(token_ids, skip_special_tokens=False)


def test_release_phase_prompts(tokenizer):
    run = prompts_for(tokenizer, "release")
    assert decode(tokenizer, run.prompt("collection", QUESTION)) == chat(f"{QUESTION}\n\n{STEP}", SYSTEM_COLLECT)
    assert decode(tokenizer, run.prompt("student", QUESTION)) == chat(f"{STEP}\n\n{QUESTION}")
    assert decode(tokenizer, run.prompt("eval", QUESTION)) == chat(f"{STEP}\n\n{QUESTION}")
    assert decode(tokenizer, run.prompt("srt_generation", QUESTION)) == chat(QUESTION, STEP)


def test_release_collection_revision_continues_the_assistant_turn(tokenizer):
    run = prompts_for(tokenizer, "release")
    context = run.revision("collection", QUESTION, ids(tokenizer, Y_INIT, end=True), 0)
    assert decode(tokenizer, context) == chat(f"{QUESTION}\n\n{STEP}", SYSTEM_COLLECT) + f"{Y_INIT}\n\n{QWEN_WRONG}\n\n"


def test_release_srt_stage1_and_stage2_layouts_and_masks(tokenizer):
    run = prompts_for(tokenizer, "release")
    y_init, y_rev = ids(tokenizer, Y_INIT, end=True), ids(tokenizer, Y_REV, end=True)
    stage1 = run.srt_generation(QUESTION, y_init, 0, y_rev)
    completion1 = f"{Y_INIT}\n\n{QWEN_WRONG}\n\n{Y_REV}{END}"
    assert decode(tokenizer, stage1.ids) == chat(QUESTION, STEP) + completion1
    assert decode(tokenizer, [t for t, m in zip(stage1.ids, stage1.loss_mask) if m]) == completion1
    stage2 = run.srt_revision(QUESTION, y_init, 0, y_rev)
    assert decode(tokenizer, stage2.ids) == chat(f"{QUESTION}\n\n{Y_INIT}\n\n{QWEN_WRONG}", STEP) + f"{Y_REV}{END}"
    assert decode(tokenizer, [t for t, m in zip(stage2.ids, stage2.loss_mask) if m]) == f"{Y_REV}{END}"
    # the attempt's sampled ids (less the end token) are spliced into the user turn as they are
    body = y_init[:-1]
    assert any(stage2.ids[i : i + len(body)] == body for i in range(len(stage2.ids)))


def test_release_srt_completion_gets_one_end_token_even_when_cut_by_a_stop_string(tokenizer):
    run = prompts_for(tokenizer, "release")
    cut = ids(tokenizer, Y_REV)  # a stop string ended it: no end token was sampled
    example = run.srt_revision(QUESTION, ids(tokenizer, Y_INIT), 0, cut)
    assert decode(tokenizer, example.ids).endswith(f"{Y_REV}{END}")
    assert example.ids.count(tokenizer.eos_token_id) == chat("q", STEP).count(END) + 1


def test_release_teacher_keeps_the_first_end_token(tokenizer):
    run = prompts_for(tokenizer, "release")
    y = ids(tokenizer, Y_INIT, end=True)
    context = run.teacher(QUESTION, y, 0)
    assert decode(tokenizer, context.ids) == chat(f"{STEP}\n\n{QUESTION}") + f"{Y_INIT}{END}\n\n{QWEN_WRONG}\n\n{Y_INIT}{END}"
    assert context.ids[context.response_start : context.response_end] == y


def test_paper_layouts(tokenizer):
    run = prompts_for(tokenizer, "paper")
    y_init, y_rev = ids(tokenizer, Y_INIT, end=True), ids(tokenizer, Y_REV, end=True)
    for phase in ("collection", "srt_generation", "student", "eval", "teacher"):
        assert decode(tokenizer, run.prompt(phase, QUESTION)) == chat(QUESTION)
    teacher = run.teacher(QUESTION, y_init, 0)
    assert decode(tokenizer, teacher.ids) == chat(QUESTION) + f"{Y_INIT}\n\n{PAPER_WRONG}\n\n{Y_INIT}{END}"
    generation = run.srt_generation(QUESTION, y_init, 0, y_rev)
    revision = run.srt_revision(QUESTION, y_init, 0, y_rev)
    # the paper's joint loss: one sequence, two loss ranges
    assert generation.ids == revision.ids
    assert decode(tokenizer, generation.ids) == chat(QUESTION) + f"{Y_INIT}\n\n{PAPER_WRONG}\n\n{Y_REV}{END}"
    assert decode(tokenizer, revision.ids[revision.loss_start:]) == f"{Y_REV}{END}"
    assert decode(tokenizer, generation.ids[generation.loss_start:]) == f"{Y_INIT}\n\n{PAPER_WRONG}\n\n{Y_REV}{END}"
    correct = run.revision("eval", QUESTION, y_rev, 1)
    assert decode(tokenizer, correct) == chat(QUESTION) + f"{Y_REV}\n\nLet me rephrase the above solution.\n\n"


def test_recipe_sets_defaults_and_an_explicit_key_wins(tmp_path):
    release = load_config(overrides=["recipe=release"])
    assert (release.distill.kl, release.srt_train.mode, release.srt_collect.revise_correct) == ("mixed", "sequential", False)
    assert (release.srt_collect.n_init, release.srt_collect.top_p, release.srt_collect.target_kept) == (3, 0.9, 6000)
    assert release.distill.optimizer.adam_beta2 == 0.999 and release.distill.optimizer.warmup_start_factor == 0.1
    assert release.math.extraction == "release" and release.distill.validation.interval == 20
    paper = load_config()
    assert (paper.distill.kl, paper.srt_train.mode, paper.data.p_r_preset) == ("reverse", "joint", "paper")
    path = tmp_path / "run.yaml"
    path.write_text("recipe: release\ndistill:\n  kl: reverse\n")
    from_file = load_config(path, ["srt_collect.n_init=2"])
    assert (from_file.distill.kl, from_file.srt_collect.n_init, from_file.srt_train.mode) == ("reverse", 2, "sequential")
    with pytest.raises(ConfigError, match="recipe: 'book' is not one of: paper, release"):
        load_config(overrides=["recipe=book"])


@pytest.mark.parametrize("architecture, phrase", [
    ("Olmo3ForCausalLM", "Wrong. I need to redo all."),
    ("Olmo2ForCausalLM", "Wrong. I need to redo all."),
    ("Qwen3ForCausalLM", QWEN_WRONG),
    ("Qwen2ForCausalLM", QWEN_WRONG),
])
def test_auto_preset_follows_the_architecture_not_the_path(tmp_path, architecture, phrase):
    # a directory whose name says the other family: only config.json may decide
    model_dir = tmp_path / ("qwen-finetune" if architecture.startswith("Olmo") else "olmo-finetune")
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    cfg = load_config(overrides=["recipe=release"])
    assert config_architecture(model_dir) == architecture
    run = run_prompts(cfg, ModelSource(model_dir, "hf"), build_char_tokenizer())
    assert run.phrases.incorrect == phrase
    assert run.phrases.correct == "Let me rephrase the above solution."


def test_auto_preset_refuses_an_unknown_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    cfg = load_config(overrides=["recipe=release"])
    with pytest.raises(ConfigError, match="LlamaForCausalLM.*set data.p_r_preset to paper, qwen, olmo or custom"):
        run_prompts(cfg, ModelSource(tmp_path, "hf"), build_char_tokenizer())


def test_presets_hold_the_release_and_paper_phrases():
    assert P_R_PRESETS["paper"].incorrect == PAPER_WRONG
    assert P_R_PRESETS["qwen"].incorrect == QWEN_WRONG
    assert control_phrases_from_config(load_config(overrides=["data.p_r_preset=olmo"]).data).incorrect == "Wrong. I need to redo all."


def test_collection_and_teacher_must_continue_the_assistant_turn():
    with pytest.raises(ConfigError, match="prompts.teacher.attempt: 'user' is not supported"):
        load_config(overrides=["prompts.teacher.attempt=user"])
