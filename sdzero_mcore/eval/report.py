"""Evaluation results on disk: per-run JSON, comparison tables and token-localisation figures.

Each evaluation run writes one JSON file (``eval.json`` in its output directory) with this schema;
percentages are in 0..100:

    {
      "name": str,                    # label of the run in tables
      "checkpoint": str,              # checkpoint evaluated
      "dataset": str,
      "questions": int,
      "k": int,                       # samples per question
      "temperature": float,
      "max_new_tokens": int,
      "seed": int,
      "avg_at_k": float,              # percent
      "pass_at_k": float,             # percent, unbiased estimator
      "mean_response_tokens": float,
      "keywords": {"per_response": float, "responses_with_keyword": float (0..1),
                   "counts": {phrase: int}},          # metrics.keyword_stats
      "revise": null | {              # generate-then-revise, null when not run
        "first_accuracy": float,      # percent
        "revised_accuracy": float,    # percent
        "correction_rate": float | null,  # percent; null when first_accuracy is 100 (nan)
        "first_tokens": float,        # mean tokens of first attempts
        "revised_tokens": float       # mean tokens of revisions
      },
      "budget": null | {"generations": int, "generated_tokens": int}
    }

``load_run`` requires only name, k, avg_at_k and pass_at_k, so older or partial files still load;
absent values print as "-" in ``compare_table``. Every writer here is atomic (temp file in the
target directory, then ``os.replace``) so a crashed run never leaves a truncated file.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sdzero_mcore.fileio import atomic_write_text

REQUIRED_FIELDS = ("name", "k", "avg_at_k", "pass_at_k")
RUN_FILE = "eval.json"


def _nan_to_none(value):
    """JSON has no nan; the schema writes it as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value


def write_run(path: str | Path, run: dict) -> None:
    """Write one run's results (schema above) as JSON, nan as null; infinities are an error."""
    atomic_write_text(path, json.dumps(_nan_to_none(run), indent=2, allow_nan=False) + "\n")


def load_run(path: str | Path) -> dict:
    """Read a run's results from a JSON file, or from ``eval.json`` inside a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation results at {path}")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path} holds a JSON {type(run).__name__}, expected an object")
    missing = [field for field in REQUIRED_FIELDS if field not in run]
    if missing:
        raise ValueError(f"{path} is missing required field(s): {', '.join(missing)}")
    return run


def _number(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _integer(value) -> str:
    return "-" if value is None else str(int(value))


def _row(run: dict, show_k: bool) -> list[str]:
    revise = run.get("revise") or {}
    budget = run.get("budget") or {}
    keywords = run.get("keywords") or {}
    suffix = f" (k={run['k']})" if show_k else ""
    correction = revise.get("correction_rate")
    return [
        str(run["name"]).replace("|", "\\|"),
        _number(run["avg_at_k"], 1) + suffix,
        _number(run["pass_at_k"], 1) + suffix,
        _number(revise.get("first_accuracy"), 1),
        _number(revise.get("revised_accuracy"), 1),
        # A written but null correction rate is the nan of a perfect first attempt, not a gap.
        "n/a" if "correction_rate" in revise and correction is None else _number(correction, 1),
        _number(run.get("mean_response_tokens"), 1),
        _number(keywords.get("per_response"), 2),
        _integer(budget.get("generations")),
        _integer(budget.get("generated_tokens")),
    ]


def compare_table(runs: Sequence[dict]) -> str:
    """A Markdown table with one row per run; "-" marks values a run did not record."""
    if len(runs) == 0:
        raise ValueError("no runs to compare")
    ks = {run["k"] for run in runs}
    k_label = str(next(iter(ks))) if len(ks) == 1 else "k"
    header = [
        "run", f"avg@{k_label}", f"pass@{k_label}", "first acc", "revised acc", "correction rate",
        "mean length (tokens)", "revision keywords / response", "generations", "generated tokens",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_row(run, show_k=len(ks) > 1)) + " |" for run in runs]
    return "\n".join(lines) + "\n"


def compare_runs(paths: Sequence[str | Path]) -> str:
    """``compare_table`` over the runs stored at ``paths`` (files or run directories)."""
    return compare_table([load_run(path) for path in paths])


def _checked_rewards(buckets_by_reward: dict[int, dict]) -> int:
    """Number of buckets shared by the r = 0 / r = 1 entries (output of ``localization_buckets``)."""
    unknown = set(buckets_by_reward) - {0, 1}
    if unknown or not buckets_by_reward:
        raise ValueError(f"buckets_by_reward needs keys among 0 and 1, got {sorted(buckets_by_reward)}")
    sizes = {len(buckets["mean_kl"]) for buckets in buckets_by_reward.values()}
    if len(sizes) != 1:
        raise ValueError(f"reward groups have different bucket counts: {sorted(sizes)}")
    return sizes.pop()


def write_localization_csv(path: str | Path, buckets_by_reward: dict[int, dict]) -> None:
    """One row per bucket with mean KL and KL share for r = 0 and r = 1; nan or absent groups are empty cells."""
    num_buckets = _checked_rewards(buckets_by_reward)

    def cell(reward: int, key: str, bucket: int) -> str:
        value = buckets_by_reward[reward][key][bucket] if reward in buckets_by_reward else math.nan
        return "" if math.isnan(value) else repr(float(value))

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["bucket", "mean_kl_r0", "kl_share_r0", "mean_kl_r1", "kl_share_r1"])
    for bucket in range(num_buckets):
        writer.writerow([bucket] + [cell(r, key, bucket) for r in (0, 1) for key in ("mean_kl", "kl_share")])
    atomic_write_text(path, buffer.getvalue())


def plot_localization(path_png: str | Path, buckets_by_reward: dict[int, dict]) -> None:
    """Mean token KL per bucket (tokens sorted by KL), one line per reward, as in the paper's Figure 4."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_buckets = _checked_rewards(buckets_by_reward)
    # A Figure with its own Agg canvas leaves pyplot's global backend and figure list untouched.
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    plotted = []
    for reward in sorted(buckets_by_reward):
        buckets = buckets_by_reward[reward]
        label = f"r = {reward} ({'correct' if reward else 'incorrect'}, {buckets['responses']} responses)"
        axes.plot(range(num_buckets), buckets["mean_kl"], marker="o", label=label)
        plotted += [value for value in buckets["mean_kl"] if not math.isnan(value)]
    if plotted and min(plotted) > 0:  # log scale shows the concentration; impossible with zeros
        axes.set_yscale("log")
    axes.set_xlabel(f"token bucket (sorted by KL, largest first; {100 / num_buckets:g}% of tokens each)")
    axes.set_ylabel("mean token KL")
    axes.set_title("Where the student-teacher KL concentrates")
    axes.legend()
    figure.tight_layout()

    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path_png.parent, prefix=f".{path_png.name}.", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, path_png)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def token_kl_html(path: str | Path, tokens: Sequence[str], kl: Sequence[float], title: str) -> None:
    """A self-contained HTML page showing ``tokens`` with backgrounds from white (KL 0) to red (max KL)."""
    if len(tokens) != len(kl):
        raise ValueError(f"tokens and kl differ in length: {len(tokens)} vs {len(kl)}")
    if not all(math.isfinite(value) for value in kl):
        raise ValueError("kl has non-finite values")
    peak = max(kl, default=0.0)
    spans = []
    for token, value in zip(tokens, kl):
        intensity = min(max(value / peak, 0.0), 1.0) if peak > 0 else 0.0
        fade = round(255 * (1.0 - intensity))
        spans.append(
            f'<span style="background: rgb(255, {fade}, {fade})" title="KL {value:.4g}">'
            f"{html.escape(token)}</span>"
        )
    page = (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n"
        "<style>body { font-family: sans-serif; } "
        "pre { white-space: pre-wrap; font-family: monospace; line-height: 1.5; }</style>\n"
        f"</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        f"<p>Background: token KL, white = 0, red = max ({peak:.4g}). Hover a token for its value.</p>\n"
        # <pre> with pre-wrap keeps the tokens' own newlines and spaces while still wrapping lines.
        f"<pre>{''.join(spans)}</pre>\n</body>\n</html>\n"
    )
    atomic_write_text(path, page)
