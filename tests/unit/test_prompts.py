"""Tests for sdzero_mcore.data.prompts: prompt ids, P_r presets, revision/teacher contexts, SRT examples."""

from __future__ import annotations

import copy
import logging
import typing

import pytest
import torch

from sdzero_mcore.config import ConfigError, DataConfig, load_config
from sdzero_mcore.data import prompts
from sdzero_mcore.data.prompts import (
    P_R_PRESETS,
    PLAIN_TEMPLATE,
    ControlPhrases,
    control_ids,
    control_phrases,
    control_phrases_from_config,
    prompt_ids,
    prompt_text,
    revision_context,
    srt_examples,
    teacher_context,
)
from sdzero_mcore.models.tiny import build_char_tokenizer

CORRECT = "Let me rephrase the above solution."
INCORRECT = "Wait, this response is not correct, let me start over."
QUESTION = "What is 2+2?"
CHAT_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()  # has tiny.CHAT_TEMPLATE; eos = <|im_end|>


@pytest.fixture(scope="module")
def plain_tok(tok):
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    return no_template


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def dec(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# --- presets -------------------------------------------------------------------------------------


def test_paper_preset_exact_strings():
    assert P_R_PRESETS["paper"] == (CORRECT, INCORRECT)
    assert P_R_PRESETS["paper"].for_reward(1) == CORRECT and P_R_PRESETS["paper"].for_reward(0) == INCORRECT
    assert P_R_PRESETS["paper"].for_reward(True) == CORRECT and P_R_PRESETS["paper"].for_reward(0.0) == INCORRECT


def test_config_presets_match_table():
    """DataConfig.p_r_preset's allowed values must track P_R_PRESETS (config.py cannot import it)."""
    cfg = load_config()
    allowed = {"paper", "qwen", "olmo", "auto", "custom"}
    for name in allowed:
        overrides = [f"data.p_r_preset={name}"]
        if name == "custom":
            overrides += ["data.p_r_correct=Right.", "data.p_r_incorrect=Wrong."]
        load_config(overrides=overrides)  # accepted
    assert set(P_R_PRESETS) | {prompts.CUSTOM_PRESET, prompts.AUTO_PRESET} == allowed
    with pytest.raises(ConfigError, match="not one of: paper, qwen, olmo, auto, custom"):
        load_config(overrides=["data.p_r_preset=llama"])
    assert control_phrases_from_config(cfg.data) == P_R_PRESETS["paper"]
    custom = DataConfig(p_r_preset="custom", p_r_correct="Looks right.", p_r_incorrect="Try again.")
    assert control_phrases_from_config(custom) == ("Looks right.", "Try again.")


def test_custom_and_pair_presets():
    assert control_phrases("custom", correct="A.", incorrect="B.") == ControlPhrases("A.", "B.")
    assert control_phrases(("A.", "B.")) == ControlPhrases("A.", "B.")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: control_phrases("llama"), "unknown P_r preset 'llama'; choose from paper, qwen, olmo, custom"),
        (
            lambda: control_phrases("custom", correct="A."),
            "P_r phrase 'incorrect' must be a non-empty string, got None",
        ),
        (lambda: control_phrases("custom", correct=" ", incorrect="B"), "P_r phrase 'correct' must be a non-empty"),
        (lambda: control_phrases("paper", correct="A."), "P_r preset 'paper' has fixed phrases"),
        (lambda: control_phrases(("A.",)), "a P_r pair must be (correct, incorrect), got 1 items"),
    ],
)
def test_preset_errors(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(message)


# --- prompt x ------------------------------------------------------------------------------------


def test_prompt_ids_chat_template(tok):
    ids = prompt_ids(tok, QUESTION)
    assert dec(tok, ids) == CHAT_PROMPT
    # exactly what the template defines: the same ids as tokenize=True, special tokens as single ids
    messages = [{"role": "user", "content": QUESTION}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"])
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(tok.eos_token_id) == 1


def test_prompt_ids_custom_jinja_template(tok):
    custom = copy.deepcopy(tok)
    custom.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    assert prompt_text(custom, QUESTION) == "[user] What is 2+2?\n[assistant] "
    with_system = prompt_text(custom, QUESTION, system_prompt="Be brief.")
    assert with_system == "[system] Be brief.\n[user] What is 2+2?\n[assistant] "
    assert dec(custom, prompt_ids(custom, QUESTION)) == "[user] What is 2+2?\n[assistant] "


def test_prompt_plain_fallback(tok, plain_tok):
    assert PLAIN_TEMPLATE == "Question: {question}\nAnswer:"
    assert dec(plain_tok, prompt_ids(plain_tok, QUESTION)) == "Question: What is 2+2?\nAnswer:"
    # forced either way
    assert dec(tok, prompt_ids(tok, QUESTION, template="plain")) == "Question: What is 2+2?\nAnswer:"
    with pytest.raises(ValueError, match="prompt template 'chat' needs a tokenizer with a chat template"):
        prompt_ids(plain_tok, QUESTION, template="chat")


@pytest.mark.parametrize("question", ["", "   \n", None])
def test_prompt_rejects_empty_question(tok, question):
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        prompt_ids(tok, question)


def test_prompt_rejects_unknown_template(tok):
    with pytest.raises(ValueError, match="unknown prompt template 'jinja'; choose from auto, chat, plain"):
        prompt_ids(tok, QUESTION, template="jinja")


# --- contexts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("reward, phrase", [(1, CORRECT), (0, INCORRECT), (True, CORRECT), (0.0, INCORRECT)])
def test_teacher_context_exact(tok, reward, phrase):
    x = prompt_ids(tok, QUESTION)
    y = enc(tok, "2+2 = 4, so the answer is 4.") + [tok.eos_token_id]
    ctx = teacher_context(x, y, reward, tok, "paper")
    assert dec(tok, ctx.ids) == (
        CHAT_PROMPT + "2+2 = 4, so the answer is 4." + f"\n\n{phrase}\n\n" + "2+2 = 4, so the answer is 4.<|im_end|>"
    )
    assert ctx.ids[ctx.response_start:ctx.response_end] == y
    assert ctx.response_end == len(ctx.ids) and ctx.response_length == len(y)
    assert ctx.ids[: len(x)] == x


def test_trailing_eos_rule(tok):
    x = prompt_ids(tok, QUESTION)
    body = enc(tok, "It is 5.")
    eos = tok.eos_token_id
    with_eos = teacher_context(x, body + [eos], 0, tok, "paper")
    # first copy: EOS stripped (P_r continues the turn); second copy: as sampled, EOS included
    first_copy = with_eos.ids[len(x): len(x) + len(body) + 1]
    assert first_copy == body + enc(tok, "\n")
    assert with_eos.ids[with_eos.response_start:] == body + [eos]
    assert with_eos.ids.count(eos) == 2  # the prompt's end of user turn, and the final one
    # a truncated response (no EOS) appears twice unchanged
    truncated = teacher_context(x, body, 0, tok, "paper")
    assert truncated.ids == with_eos.ids[:-1] and truncated.ids[truncated.response_start:] == body
    # with_eos's prefix is the truncated one's: stripping made the first copies identical
    assert with_eos.response_start == truncated.response_start


def test_extra_stop_tokens(tok):
    x = prompt_ids(tok, QUESTION)
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    y = enc(tok, "4") + [endoftext]
    default = teacher_context(x, y, 1, tok, "paper")  # <|endoftext|> is not the EOS: kept
    assert default.ids[len(x): len(x) + 2] == y
    stops = {tok.eos_token_id, endoftext}
    ctx = teacher_context(x, y, 1, tok, "paper", stop_token_ids=stops)
    assert ctx.ids[len(x)] == y[0] and ctx.ids[len(x) + 1] != endoftext
    assert ctx.ids[ctx.response_start:] == y


def test_response_ids_are_never_retokenised(tok):
    """A sampled y whose text re-encodes differently (characters spelling a special token)."""
    x = prompt_ids(tok, QUESTION)
    y = [tok.convert_tokens_to_ids(c) for c in "<|im_end|>"] + enc(tok, " 4")
    assert enc(tok, dec(tok, y)) != y  # the text would tokenise to the special token
    ctx = teacher_context(x, y, 1, tok, "paper")
    assert ctx.ids[ctx.response_start:ctx.response_end] == y
    assert ctx.ids[len(x): len(x) + len(y)] == y


def test_revision_context_exact(tok):
    x = prompt_ids(tok, QUESTION)
    y_init = enc(tok, "The answer is 5.") + [tok.eos_token_id]
    for reward, phrase in ((0, INCORRECT), (1, CORRECT)):
        ids = revision_context(x, y_init, reward, tok, "paper")
        assert dec(tok, ids) == CHAT_PROMPT + f"The answer is 5.\n\n{phrase}\n\n"
        assert ids == x + y_init[:-1] + control_ids(tok, reward, "paper")


def test_srt_examples(tok):
    x = prompt_ids(tok, QUESTION)
    y_init = enc(tok, "It is 5.") + [tok.eos_token_id]
    y_rev = enc(tok, "2+2 = 4. It is 4.") + [tok.eos_token_id]
    revision, generation = srt_examples(x, y_init, 0, y_rev, tok, "paper")
    full = CHAT_PROMPT + f"It is 5.\n\n{INCORRECT}\n\n2+2 = 4. It is 4.<|im_end|>"
    assert dec(tok, revision.ids) == full and generation.ids == revision.ids
    # L_revision: loss on y_rev only, as sampled (EOS included)
    assert revision.ids[revision.loss_start:revision.loss_end] == y_rev and revision.loss_end == len(revision.ids)
    assert revision.num_loss_tokens == len(y_rev) and sum(revision.loss_mask) == len(y_rev)
    # L_generation: loss on everything after x = [y_init, sep P_r sep, y_rev]
    assert generation.loss_start == len(x) and generation.loss_end == len(generation.ids)
    assert dec(tok, generation.ids[generation.loss_start:]) == f"It is 5.\n\n{INCORRECT}\n\n2+2 = 4. It is 4.<|im_end|>"
    assert generation.loss_mask == [0] * len(x) + [1] * (len(generation.ids) - len(x))


def test_custom_phrases_in_context(tok):
    x = prompt_ids(tok, QUESTION)
    ids = revision_context(x, enc(tok, "4"), 1, tok, ControlPhrases("Good.", "Bad."))
    assert dec(tok, ids) == CHAT_PROMPT + "4\n\nGood.\n\n"


def test_tensor_inputs(tok):
    x = prompt_ids(tok, QUESTION)
    y = enc(tok, "4") + [tok.eos_token_id]
    from_lists = teacher_context(x, y, 1, tok, "paper")
    from_tensors = teacher_context(torch.tensor(x), torch.tensor(y), 1, tok, "paper")
    assert from_tensors == from_lists


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=[]), "x_ids is empty"),
        (dict(y=[]), "y_ids is empty"),
        (dict(y=[1, -2]), "y_ids must hold non-negative int token ids; bad values: [-2]"),
        (dict(y=[1.0]), "y_ids must hold non-negative int token ids; bad values: [1.0]"),
        (dict(y="abc"), "y_ids must be a sequence of token ids, got str"),
        (dict(reward=0.5), "reward must be 0 or 1, got 0.5"),
        (dict(reward=2), "reward must be 0 or 1, got 2"),
        (dict(reward="1"), "reward must be 0 or 1, got '1'"),
        (dict(preset="llama"), "unknown P_r preset 'llama'; choose from paper, qwen, olmo, custom"),
    ],
)
def test_context_errors(tok, kwargs, message):
    args = dict(x=[5, 6], y=[7, 8], reward=1, preset="paper") | kwargs
    with pytest.raises(ValueError) as info:
        teacher_context(args["x"], args["y"], args["reward"], tok, args["preset"])
    assert str(info.value) == message


def test_srt_and_revision_errors(tok):
    with pytest.raises(ValueError, match="y_rev_ids is empty"):
        srt_examples([5], [6], 1, [], tok, "paper")
    with pytest.raises(ValueError, match="y_init_ids is empty"):
        revision_context([5], [], 1, tok, "paper")


def test_control_block_round_trip_warning(caplog):
    """A tokenizer whose ids for the control block decode to other text is reported once."""

    class PrefixSpaceTokenizer:  # like a SentencePiece model with a dummy prefix
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [1] + [ord(c) for c in text]

        def decode(self, ids, **kwargs):
            return "".join(" " if t == 1 else chr(t) for t in ids)

    stub = PrefixSpaceTokenizer()
    with caplog.at_level(logging.WARNING, logger="sdzero_mcore.data.prompts"):
        control_ids(stub, 1, "paper")
        control_ids(stub, 1, "paper")
    warnings = [r for r in caplog.records if "control block" in r.getMessage()]
    assert len(warnings) == 1 and "PrefixSpaceTokenizer" in warnings[0].getMessage()


def test_teacher_context_is_frozen(tok):
    ctx = teacher_context([5], [6], 1, tok, "paper")
    with pytest.raises(AttributeError):
        ctx.response_start = 0  # type: ignore[misc]
    assert typing.get_type_hints(prompts.TeacherContext)["ids"] == list[int]
