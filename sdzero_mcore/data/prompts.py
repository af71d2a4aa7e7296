"""Prompts and SD-Zero contexts, built on token ids.

A sampled response is never re-tokenised: the student must be trained (and the teacher
conditioned) on exactly the tokens it sampled, and ``encode(decode(y))`` need not give ``y`` back.
Only text that the trainer itself writes is tokenised: the prompt ``x`` and the control block
``"\\n\\n" + P_r + "\\n\\n"``, which is tokenised on its own and spliced in by id.

Layout (docs/method.md): one assistant turn holds the whole revision, so the chat template is applied
to the question only and everything after it is raw ids::

    x                     = chat_template(question) with the generation prompt
    revision context      = x + y_init' + sep(P_r)                 (the reviser's prompt)
    teacher context       = x + y'      + sep(P_r) + y             (Phase 2, y teacher-forced)
    SRT example           = x + y_init' + sep(P_r) + y_rev         (Phase 1)
    sep(P_r)              = ids("\\n\\n" + P_r + "\\n\\n")

where ``y'`` is ``y`` without trailing stop (EOS) tokens. Why strip them: the control phrase
continues the same assistant turn, and an end-of-turn token followed by more assistant text is
out of distribution for the model; the teacher must see the attempt the student produced, not a
finished turn. The *second* ``y`` of the teacher context and ``y_rev`` are kept exactly as sampled,
including a final EOS: the student is trained on that token too, and the teacher must score it.

P_r is chosen by the binary reward: ``correct`` for r = 1, ``incorrect`` for r = 0.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Optional, Sequence, Union

if TYPE_CHECKING:
    from sdzero_mcore.config import DataConfig

__all__ = [
    "AUTO_PRESET",
    "CUSTOM_PRESET",
    "PHASES",
    "PromptLayout",
    "RunPrompts",
    "preset_for_architecture",
    "CompletionExample",
    "ControlPhrases",
    "P_R_PRESETS",
    "PLAIN_TEMPLATE",
    "PROMPT_TEMPLATES",
    "SEPARATOR",
    "SRTExamples",
    "TeacherContext",
    "control_ids",
    "control_phrases",
    "control_phrases_from_config",
    "control_text",
    "default_stop_ids",
    "prompt_ids",
    "prompt_text",
    "revision_context",
    "srt_examples",
    "strip_trailing_stop",
    "teacher_context",
]

logger = logging.getLogger(__name__)


class ControlPhrases(NamedTuple):
    """The two control phrases P_r: ``correct`` follows a response with r = 1, ``incorrect`` r = 0."""

    correct: str
    incorrect: str

    def for_reward(self, reward: Any) -> str:
        return self.correct if _check_reward(reward) == 1 else self.incorrect


# The paper's text (docs/method.md, "Control phrases") and the authors' release (GitHub
# princeton-pli/Self-Distillation-Zero), which words r = 0 per model family. The release picks
# the family from a substring of the model path; `auto` picks it from the architecture instead.
P_R_PRESETS: dict[str, ControlPhrases] = {
    "paper": ControlPhrases(
        correct="Let me rephrase the above solution.",
        incorrect="Wait, this response is not correct, let me start over.",
    ),
    "qwen": ControlPhrases(
        correct="Let me rephrase the above solution.",
        incorrect="Wait, this response is wrong. Let me correct it.",
    ),
    "olmo": ControlPhrases(
        correct="Let me rephrase the above solution.",
        incorrect="Wrong. I need to redo all.",
    ),
}
AUTO_PRESET = "auto"  # qwen or olmo from the architecture named in the model's config.json
# architecture name prefix -> preset (Qwen2/Qwen2.5/Qwen3 and their MoE variants; OLMo 1-3)
ARCHITECTURE_PRESETS = (("Qwen", "qwen"), ("Olmo", "olmo"))
CUSTOM_PRESET = "custom"  # the two phrases come from the config (data.p_r_correct / data.p_r_incorrect)

SEPARATOR = "\n\n"  # between the response and P_r, and between P_r and the revision

# Fallback for tokenizers without a chat template (base models). No trailing space after
# "Answer:": BPE vocabularies attach a space to the following word (" The"), so a prompt ending in
# a space would force an unusual split of the model's first token.
PLAIN_TEMPLATE = "Question: {question}\nAnswer:"
PROMPT_TEMPLATES = ("auto", "chat", "plain")

Preset = Union[str, ControlPhrases, tuple]


# ---------------------------------------------------------------------------------------------
# Control phrases


def control_phrases(
    preset: Preset, *, correct: Optional[str] = None, incorrect: Optional[str] = None
) -> ControlPhrases:
    """The phrases of ``preset``: a key of ``P_R_PRESETS``, ``"custom"`` (then ``correct`` and
    ``incorrect`` are required), or a ``(correct, incorrect)`` pair."""
    if isinstance(preset, tuple):
        if len(preset) != 2:
            raise ValueError(f"a P_r pair must be (correct, incorrect), got {len(preset)} items")
        phrases = ControlPhrases(*preset)
    elif preset == CUSTOM_PRESET:
        phrases = ControlPhrases(correct, incorrect)  # type: ignore[arg-type]
    elif isinstance(preset, str) and preset in P_R_PRESETS:
        if correct is not None or incorrect is not None:
            # Not silently ignored: the caller probably meant the custom preset.
            raise ValueError(f"P_r preset {preset!r} has fixed phrases; custom phrases need preset 'custom'")
        return P_R_PRESETS[preset]
    else:
        raise ValueError(
            f"unknown P_r preset {preset!r}; choose from {', '.join([*P_R_PRESETS, CUSTOM_PRESET])}"
        )
    for name, text in zip(("correct", "incorrect"), phrases, strict=True):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"P_r phrase {name!r} must be a non-empty string, got {text!r}")
    return phrases


def preset_for_architecture(architecture: Optional[str]) -> str:
    """The release's P_r preset for a model architecture (``config.json``'s ``architectures[0]``)."""
    for prefix, preset in ARCHITECTURE_PRESETS:
        if architecture and architecture.startswith(prefix):
            return preset
    raise ValueError(
        f"data.p_r_preset=auto knows the release's phrases for Qwen and OLMo models only; the model's architecture "
        f"is {architecture!r}: set data.p_r_preset to paper, qwen, olmo or custom"
    )


def control_phrases_from_config(data: "DataConfig", architecture: Optional[str] = None) -> ControlPhrases:
    """The P_r phrases a run's ``data`` section selects (``p_r_preset``, ``p_r_correct``/``p_r_incorrect``);
    ``auto`` resolves through the model's ``architecture``."""
    preset = preset_for_architecture(architecture) if data.p_r_preset == AUTO_PRESET else data.p_r_preset
    return control_phrases(preset, correct=data.p_r_correct, incorrect=data.p_r_incorrect)


def _check_reward(reward: Any) -> int:
    # Binary rewards only: a fractional reward (e.g. a fraction of tests passed) has no P_r.
    if isinstance(reward, numbers.Real) and reward in (0, 1):
        return int(reward)
    raise ValueError(f"reward must be 0 or 1, got {reward!r}")


def control_text(reward: Any, preset: Preset) -> str:
    """``"\\n\\n" + P_r + "\\n\\n"`` for a binary ``reward``."""
    return SEPARATOR + control_phrases(preset).for_reward(reward) + SEPARATOR


_warned_round_trip: set[tuple[str, str]] = set()


def control_ids(tokenizer: Any, reward: Any, preset: Preset) -> list[int]:
    """The ids of the control block, tokenised on its own without special tokens (no BOS)."""
    text = control_text(reward, preset)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    # SentencePiece tokenizers with a dummy prefix add a space before "\n\n" when it starts the
    # text; that would put a stray token between the response and P_r. Say so once per phrase.
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    key = (type(tokenizer).__name__, text)
    if decoded != text and key not in _warned_round_trip:
        _warned_round_trip.add(key)
        logger.warning(
            "the control block %r tokenises to ids that decode to %r with %s; the teacher context will hold "
            "those ids", text, decoded, type(tokenizer).__name__,
        )
    return ids


# ---------------------------------------------------------------------------------------------
# Prompts


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _uses_chat(tokenizer: Any, template: str) -> bool:
    return template == "chat" or (template == "auto" and _has_chat_template(tokenizer))


def prompt_text(
    tokenizer: Any,
    question: str,
    *,
    template: str = "auto",
    system_prompt: Optional[str] = None,
    chat_template_kwargs: Optional[dict] = None,
) -> str:
    """The prompt x as text: the chat template with its generation prompt, or ``PLAIN_TEMPLATE``.

    ``template``: ``chat`` (the tokenizer's template; an error if it has none), ``plain``, or
    ``auto`` (chat when the tokenizer has a template, else plain). ``chat_template_kwargs`` go to
    ``apply_chat_template`` (e.g. ``{"enable_thinking": False}`` for Qwen3 hybrid models).
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose from {', '.join(PROMPT_TEMPLATES)}")
    use_chat = _uses_chat(tokenizer, template)
    if not use_chat:
        if system_prompt:
            return system_prompt + "\n\n" + PLAIN_TEMPLATE.format(question=question)
        return PLAIN_TEMPLATE.format(question=question)
    if not _has_chat_template(tokenizer):
        raise ValueError(
            f"prompt template 'chat' needs a tokenizer with a chat template; {type(tokenizer).__name__} "
            "has none (use 'auto' or 'plain' for the plain fallback)"
        )
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}
    ]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
    )


def prompt_ids(
    tokenizer: Any,
    question: str,
    *,
    template: str = "auto",
    system_prompt: Optional[str] = None,
    chat_template_kwargs: Optional[dict] = None,
) -> list[int]:
    """The prompt x as ids, ending with the chat template's generation prompt.

    Chat: the rendered template already contains every special token the model expects (a BOS
    where the template writes one), so it is encoded with ``add_special_tokens=False``; adding
    them again would double the BOS. These are the ids ``apply_chat_template(tokenize=True)``
    gives. Plain: encoded with the tokenizer's own special tokens (e.g. a base model's BOS).
    """
    use_chat = _uses_chat(tokenizer, template)
    text = prompt_text(
        tokenizer, question, template=template, system_prompt=system_prompt, chat_template_kwargs=chat_template_kwargs
    )
    return list(tokenizer.encode(text, add_special_tokens=not use_chat))


# ---------------------------------------------------------------------------------------------
# Contexts on ids


def solution_ids(tokenizer: Any, solution: str) -> list[int]:
    """A worked solution as the model writes it after the prompt (no EOS): step 0's targets and SDFT's gold context."""
    return tokenizer.encode(" " + solution, add_special_tokens=False)


def default_stop_ids(tokenizer: Any, extra: Iterable[int] = ()) -> frozenset[int]:
    """The tokens that end a response: the tokenizer's EOS plus ``extra`` (pass the rollout's
    ``SamplingParams.stop_token_ids`` when it stops on more than the EOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    return frozenset(int(t) for t in [*eos_ids, *extra])


def _as_ids(name: str, ids: Any, *, allow_empty: bool = False) -> list[int]:
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{name} must be a sequence of token ids, got {type(ids).__name__}")
    out = list(ids)
    bad = [t for t in out if isinstance(t, bool) or not isinstance(t, int) or t < 0]
    if bad:
        raise ValueError(f"{name} must hold non-negative int token ids; bad values: {bad[:5]}")
    if not out and not allow_empty:
        raise ValueError(f"{name} is empty")
    return out


def strip_trailing_stop(ids: Sequence[int], stop_ids: Iterable[int]) -> list[int]:
    """``ids`` without its trailing stop tokens (all of them, should a sampler emit several)."""
    stops = set(stop_ids)
    end = len(ids)
    while end > 0 and ids[end - 1] in stops:
        end -= 1
    return list(ids[:end])


def _stops(tokenizer: Any, stop_token_ids: Optional[Iterable[int]]) -> frozenset[int]:
    return default_stop_ids(tokenizer) if stop_token_ids is None else frozenset(int(t) for t in stop_token_ids)


def revision_context(
    x_ids: Sequence[int],
    y_init_ids: Sequence[int],
    reward: Any,
    tokenizer: Any,
    preset: Preset,
    *,
    stop_token_ids: Optional[Iterable[int]] = None,
) -> list[int]:
    """The reviser's prompt: ``x + y_init' + ids("\\n\\n" + P_r + "\\n\\n")``.

    ``y_init'`` is ``y_init`` without trailing stop tokens (``stop_token_ids``; default: the
    tokenizer's EOS). A revision sampled from this context continues the same assistant turn.
    """
    x = _as_ids("x_ids", x_ids)
    y_init = _as_ids("y_init_ids", y_init_ids)
    return x + strip_trailing_stop(y_init, _stops(tokenizer, stop_token_ids)) + control_ids(tokenizer, reward, preset)


@dataclass(frozen=True)
class TeacherContext:
    """The teacher's input ``x + y' + sep(P_r) + y`` and where the second ``y`` lies in it.

    ``ids[response_start:response_end]`` equals the sampled ``y``. Under next-token prediction
    the teacher logits that score ``y`` are those at positions
    ``[response_start - 1, response_end - 1)``, matching the student's at
    ``[len(x) - 1, len(x) + len(y) - 1)`` on ``x + y``.
    """

    ids: list[int]
    response_start: int
    response_end: int

    @property
    def response_length(self) -> int:
        return self.response_end - self.response_start


def teacher_context(
    x_ids: Sequence[int],
    y_ids: Sequence[int],
    reward: Any,
    tokenizer: Any,
    preset: Preset,
    *,
    stop_token_ids: Optional[Iterable[int]] = None,
    keep_end_token: bool = False,
) -> TeacherContext:
    """The Phase 2 teacher context for the student response ``y``: the first copy without its trailing
    stop tokens (with them when ``keep_end_token``, the release's layout), the second as sampled."""
    x = _as_ids("x_ids", x_ids)
    y = _as_ids("y_ids", y_ids)
    first = y if keep_end_token else strip_trailing_stop(y, _stops(tokenizer, stop_token_ids))
    prefix = x + first + control_ids(tokenizer, reward, preset)
    return TeacherContext(ids=prefix + y, response_start=len(prefix), response_end=len(prefix) + len(y))


@dataclass(frozen=True)
class CompletionExample:
    """A completion-only training sequence: NLL on ``ids[loss_start:loss_end]`` only.

    ``loss_mask[i] == 1`` when ``ids[i]`` is a target token (the trainer shifts by one for
    next-token prediction: the logits at ``i - 1`` predict ``ids[i]``).
    """

    ids: list[int]
    loss_start: int
    loss_end: int

    @property
    def loss_mask(self) -> list[int]:
        return [1 if self.loss_start <= i < self.loss_end else 0 for i in range(len(self.ids))]

    @property
    def num_loss_tokens(self) -> int:
        return self.loss_end - self.loss_start


class SRTExamples(NamedTuple):
    """The two terms of L_SRT for one kept (x, y_init, P_r, y_rev) record.

    Both hold the same ids ``x + y_init' + sep(P_r) + y_rev``; only the loss range differs, so a
    trainer may score both with one forward pass.
    """

    revision: CompletionExample  # L_revision: predict y_rev given (x, y_init, P_r)
    generation: CompletionExample  # L_generation: predict [y_init, P_r, y_rev] given x


def srt_examples(
    x_ids: Sequence[int],
    y_init_ids: Sequence[int],
    reward: Any,
    y_rev_ids: Sequence[int],
    tokenizer: Any,
    preset: Preset,
    *,
    stop_token_ids: Optional[Iterable[int]] = None,
) -> SRTExamples:
    """The L_revision and L_generation examples of Phase 1 (docs/method.md), ``y_rev`` kept as sampled.

    In L_generation the model learns to continue ``y_init`` straight into P_r, which is why the
    EOS that ended the sampled ``y_init`` is not part of the sequence.
    """
    context = revision_context(x_ids, y_init_ids, reward, tokenizer, preset, stop_token_ids=stop_token_ids)
    y_rev = _as_ids("y_rev_ids", y_rev_ids)
    ids = context + y_rev
    prompt_length = len(_as_ids("x_ids", x_ids))
    return SRTExamples(
        revision=CompletionExample(ids, loss_start=len(context), loss_end=len(ids)),
        generation=CompletionExample(list(ids), loss_start=prompt_length, loss_end=len(ids)),
    )


# ---------------------------------------------------------------------------------------------
# Per-phase layouts (the `prompts` config section)

PHASES = ("collection", "srt_generation", "srt_revision", "student", "teacher", "eval")
# Stands for the attempt's ids while a user-turn prompt goes through the chat template: the
# template renders text, but the attempt must stay the sampled ids, so they are spliced in here.
_ATTEMPT_SLOT = "\x00sdzero-attempt\x00"


@dataclass(frozen=True)
class PromptLayout:
    """One phase's prompt: ``system``, the user turn ``prefix + question + suffix``, and where an attempt goes."""

    system: Optional[str] = None
    prefix: str = ""
    suffix: str = ""
    attempt: str = "assistant"  # or "user"

    @classmethod
    def from_config(cls, section: Any) -> "PromptLayout":
        return cls(system=section.system or None, prefix=section.prefix, suffix=section.suffix, attempt=section.attempt)

    def user_text(self, question: str) -> str:
        return self.prefix + question + self.suffix


class RunPrompts:
    """Every context a run builds, per phase, on token ids (docs/method.md, "Prompts").

    Made once per phase run from the config (:meth:`from_config`). Attempts and revisions are
    sampled ids and are never re-tokenised; only text the trainer writes is encoded.
    """

    def __init__(self, tokenizer: Any, phrases: ControlPhrases, layouts: dict[str, PromptLayout], *,
                 template: str = "auto", stop_token_ids: Optional[Iterable[int]] = None,
                 teacher_keeps_end_token: bool = False) -> None:
        missing = [phase for phase in PHASES if phase not in layouts]
        if missing:
            raise ValueError(f"prompt layouts missing for {missing}")
        self.tokenizer = tokenizer
        self.phrases = phrases
        self.layouts = dict(layouts)
        self.template = template
        self.stop_ids = _stops(tokenizer, stop_token_ids)
        self.teacher_keeps_end_token = teacher_keeps_end_token
        eos = getattr(tokenizer, "eos_token_id", None)
        self.end_ids = [] if eos is None else [int(eos)]

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any, architecture: Optional[str] = None, **kwargs: Any) -> "RunPrompts":
        layouts = {phase: PromptLayout.from_config(getattr(cfg.prompts, phase)) for phase in PHASES}
        return cls(tokenizer, control_phrases_from_config(cfg.data, architecture), layouts,
                   template=cfg.data.prompt_template, teacher_keeps_end_token=cfg.distill.teacher_keeps_end_token,
                   **kwargs)

    def prompt(self, phase: str, question: str) -> list[int]:
        """The prompt x of ``phase`` for ``question``, ending with the generation prompt."""
        layout = self.layouts[phase]
        return prompt_ids(self.tokenizer, layout.user_text(question), template=self.template, system_prompt=layout.system)

    def revision(self, phase: str, question: str, y_init_ids: Sequence[int], reward: Any,
                 *, x_ids: Optional[Sequence[int]] = None) -> list[int]:
        """The reviser's prompt in ``phase``'s layout; ``x_ids`` reuses an already built prompt (assistant layout)."""
        layout = self.layouts[phase]
        y_init = strip_trailing_stop(_as_ids("y_init_ids", y_init_ids), self.stop_ids)
        if layout.attempt == "assistant":
            x = list(x_ids) if x_ids is not None else self.prompt(phase, question)
            return _as_ids("x_ids", x) + y_init + control_ids(self.tokenizer, reward, self.phrases)
        # user turn: "{question}\n\n{y_init}\n\n{P_r}", then a fresh assistant turn
        user = layout.user_text(question) + SEPARATOR + _ATTEMPT_SLOT + SEPARATOR + self.phrases.for_reward(reward)
        text = prompt_text(self.tokenizer, user, template=self.template, system_prompt=layout.system)
        if text.count(_ATTEMPT_SLOT) != 1:
            raise ValueError(f"the {phase} prompt holds the attempt {text.count(_ATTEMPT_SLOT)} times after templating")
        before, after = text.split(_ATTEMPT_SLOT)
        use_chat = _uses_chat(self.tokenizer, self.template)
        return (list(self.tokenizer.encode(before, add_special_tokens=not use_chat)) + y_init
                + list(self.tokenizer.encode(after, add_special_tokens=False)))

    def teacher(self, question: str, y_ids: Sequence[int], reward: Any,
                *, x_ids: Optional[Sequence[int]] = None) -> TeacherContext:
        """x + y (+ its end token when ``teacher_keeps_end_token``) + sep(P_r) + y, the second y as sampled."""
        x = list(x_ids) if x_ids is not None else self.prompt("teacher", question)
        return teacher_context(x, y_ids, reward, self.tokenizer, self.phrases, stop_token_ids=self.stop_ids,
                               keep_end_token=self.teacher_keeps_end_token)

    def _completion(self, ids: Sequence[int]) -> list[int]:
        # a completion ends with exactly one end token, whether it was sampled or cut by a stop string
        return strip_trailing_stop(_as_ids("completion", ids), self.stop_ids) + self.end_ids

    def srt_generation(self, question: str, y_init_ids: Sequence[int], reward: Any, y_rev_ids: Sequence[int]) -> CompletionExample:
        """L_generation / SRT stage 1: x -> ``y_init + "\\n\\n" + P_r + "\\n\\n" + y_rev`` + end token."""
        x = self.prompt("srt_generation", question)
        y_init = strip_trailing_stop(_as_ids("y_init_ids", y_init_ids), self.stop_ids)
        ids = x + y_init + control_ids(self.tokenizer, reward, self.phrases) + self._completion(y_rev_ids)
        return CompletionExample(ids, loss_start=len(x), loss_end=len(ids))

    def srt_revision(self, question: str, y_init_ids: Sequence[int], reward: Any, y_rev_ids: Sequence[int]) -> CompletionExample:
        """L_revision / SRT stage 2: the reviser's prompt -> ``y_rev`` + end token."""
        context = self.revision("srt_revision", question, y_init_ids, reward)
        ids = context + self._completion(y_rev_ids)
        return CompletionExample(ids, loss_start=len(context), loss_end=len(ids))
