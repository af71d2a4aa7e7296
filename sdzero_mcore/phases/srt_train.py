"""Phase 1 training (``sdzero srt-train``): L_SRT = L_revision + L_generation on D_revision.

For each kept record (x, y_init, P_r, y_rev) the sequence is x + y_init + sep(P_r) + y_rev (the
trailing EOS of y_init removed, ``data.prompts.srt_examples``):

* L_revision: NLL of y_rev given x + y_init + P_r (loss on the y_rev tokens only);
* L_generation: NLL of [y_init, P_r, y_rev] given x (loss on everything after x).

Both are completion-only token means over the global batch, summed (``srt_train.mode=joint``,
the paper), or trained one after the other as two SFT stages, generation then revision
(``mode=sequential``, the released code's variant). One forward pass scores both terms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from sdzero_mcore.checkpoint.source import ModelSource, start_source
from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.data.prompts import control_phrases_from_config, srt_examples
from sdzero_mcore.phases.completion import train_completion_stage
from sdzero_mcore.phases.srt_collect import REVISION_FILE, collect_dir
from sdzero_mcore.run_setup import check_layout, load_tokenizer, pad_id, setup_parallel

PHASE = "srt"


def load_examples(path: Path, tokenizer, preset, max_len: int) -> list:
    """SRT examples from a D_revision file; records longer than ``max_len`` tokens are dropped (counted)."""
    if not path.is_file():
        raise ConfigError(f"srt-train: D_revision file {path} does not exist (run srt-collect first)")
    examples, too_long = [], 0
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            pair = srt_examples(record["x_ids"], record["y_init_ids"], record["r_init"], record["y_rev_ids"], tokenizer, preset)
        except (json.JSONDecodeError, KeyError, ValueError) as error:
            raise ConfigError(f"{path}:{line_no}: not a D_revision record ({error})") from None
        if len(pair.revision.ids) > max_len:
            too_long += 1
            continue
        examples.append(pair)
    if not examples:
        raise ConfigError(f"{path}: no SRT examples ({too_long} longer than srt_train.max_seq_length={max_len})")
    return examples


def srt_stages(mode: str) -> list[tuple[str, tuple[str, ...]]]:
    if mode == "joint":
        return [("srt", ("revision", "generation"))]
    return [("srt_generation", ("generation",)), ("srt_revision", ("revision",))]


def run_srt_train(cfg: SDZeroConfig, init_from: Optional[str] = None, d_revision: Optional[str] = None,
                  *, max_steps: Optional[int] = None) -> Path:
    """Train on D_revision; returns the final checkpoint of the last stage."""
    tcfg = cfg.srt_train
    source = start_source(cfg, init_from)
    check_layout(cfg, source)
    tokenizer = load_tokenizer(source)
    examples = load_examples(Path(d_revision or collect_dir(cfg) / REVISION_FILE), tokenizer,
                             control_phrases_from_config(cfg.data), tcfg.max_seq_length)
    setup_parallel(cfg)
    final = None
    for stage, terms in srt_stages(tcfg.mode):
        final = train_completion_stage(cfg, source, examples, terms, stage, tcfg, pad_id(tokenizer), max_steps=max_steps)
        source = ModelSource(final, "mcore")
    return final
