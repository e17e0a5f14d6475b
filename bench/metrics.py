"""The numbers of a run directory, as Spec-Bench's evaluation/speed.py computes them (DESIGN.md §6).

A run directory holds config.json, method_stats.json and one answer file per method label
(answers/<label>.jsonl, Spec-Bench's answer schema with `--runs R` repeats as choices[0..R-1]).
`summarize` turns it into one row per (method label, group) plus an `overall` row:
- per question and run index r, throughput = Σ new_tokens / Σ wall_time over its turns;
- speedup for run r = mean throughput of the method ÷ the same mean for vanilla, over the questions
  both answered (a ratio of means); `speedup` and `speedup_std` are the mean and sample std over r;
- τ (mean accepted tokens) = mean of all accept_lengths entries, pooled over questions and runs;
- acceptance rate = accepted drafts ÷ proposed drafts.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import methods
from bench.data import GROUP_ORDER, GROUPS, group_of
from bench.drafts import acceptance_counts, per_position_acceptance, succeeded, vllm_acceptance  # noqa: F401
from bench.errors import UserError
from methods import ProfileTable, StepCosts

SUMMARY_COLUMNS = (
    "model,method,category,runs,questions,new_tokens_mean,tokens_per_s,speedup,speedup_std,"
    "mean_accepted_tokens,acceptance_rate,lossless,near_ties,diverged,trained_params,"
    "extra_memory_bytes,peak_memory_bytes"
).split(",")
INTEGER_COLUMNS = [
    "runs", "questions", "near_ties", "diverged",
    "trained_params", "extra_memory_bytes", "peak_memory_bytes",
]
BASELINE = "vanilla"
OVERALL = "overall"


@dataclass
class Run:
    """A loaded run directory: its config, per-method stats and answer records by label."""

    config: dict
    stats: dict = field(default_factory=dict)
    answers: dict[str, list[dict]] = field(default_factory=dict)
    directory: Path | None = None


# ---------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from error


def _read_answers(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict) or "question_id" not in record:
                raise UserError(f"{path}, line {number}: not an answer record (no question_id)")
            records.append(record)
    return records


def load_run(run_dir) -> Run:
    """Read a run directory. No answers at all, or a corrupt line, is a UserError."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise UserError(f"run directory {directory} does not exist")
    config_path = directory / "config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    stats_path = directory / "method_stats.json"
    stats = _read_json(stats_path) if stats_path.exists() else {}
    answers: dict[str, list[dict]] = {}
    for path in sorted((directory / "answers").glob("*.jsonl")):
        records = _read_answers(path)
        if not records:
            answers.setdefault(urllib.parse.unquote(path.stem), [])
        for record in records:
            label = record.get("model_id") or urllib.parse.unquote(path.stem)
            answers.setdefault(label, []).append(record)
    if not any(answers.values()):
        raise UserError(
            f"{directory} holds no answers (expected answers/<label>.jsonl files); "
            f"run `python -m bench run ... --out {directory}` first"
        )
    return Run(config=config, stats=stats, answers=answers, directory=directory)


# ---------------------------------------------------------------------------------------------
# Shape of the report: methods and groups


def method_labels(run: Run) -> list[str]:
    """Method labels in config order with vanilla first, then labels only seen elsewhere."""
    labels = list(run.config.get("methods", {}))
    for label in list(run.answers) + list(run.stats):
        if label not in labels:
            labels.append(label)
    if BASELINE in labels:
        labels.remove(BASELINE)
        labels.insert(0, BASELINE)
    return labels


def record_group(record: dict) -> str | None:
    """The group of an answer record: its `group` field, else derived from its category."""
    return record.get("group") or group_of(record.get("category", ""))


def report_categories(run: Run) -> list[str]:
    """The rows of each method: config["categories"], else the groups present, in GROUP_ORDER."""
    categories = run.config.get("categories")
    if categories:
        return list(categories)
    present = {record_group(r) for records in run.answers.values() for r in records}
    return [group for group in GROUP_ORDER if group in present]


def in_category(record: dict, category: str) -> bool:
    """Whether a record belongs to a report row: a group name, or a single file category."""
    if category in GROUPS:
        return record_group(record) == category
    return record.get("category") == category


def is_skipped(run: Run, label: str) -> bool:
    return run.stats.get(label, {}).get("status") == "skipped"


def temperature(run: Run) -> float:
    """The run's sampling temperature (0: greedy decoding, where the lossless columns apply)."""
    return float(run.config.get("temperature") or 0.0)


def rule(run: Run, label: str) -> str:
    """The acceptance rule a method ran with (method_stats.json): greedy, exact or typical."""
    return run.stats.get(label, {}).get("rule") or ("exact" if temperature(run) else "greedy")


def run_count(run: Run) -> int:
    """R: config["runs"], else the largest number of choices in any record."""
    if run.config.get("runs"):
        return int(run.config["runs"])
    return max((len(r.get("choices", [])) for rs in run.answers.values() for r in rs), default=1)


# ---------------------------------------------------------------------------------------------
# Per-question numbers


def choices_by_run(record: dict) -> dict[int, dict]:
    """Map run index -> choice, using each choice's `index` (its position when absent)."""
    return {int(c.get("index", i)): c for i, c in enumerate(record.get("choices", []))}


def throughput(choice: dict) -> float:
    """Σ new_tokens / Σ wall_time over the turns of one choice (NaN without time)."""
    seconds = sum(choice.get("wall_time", []))
    return sum(choice.get("new_tokens", [])) / seconds if seconds > 0 else math.nan


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def speedups_by_run(records: list[dict], baseline: list[dict], runs: int) -> list[float]:
    """Speedup for each run index: ratio of mean throughputs over the questions both answered."""
    method_by_id = {r["question_id"]: choices_by_run(r) for r in records if succeeded(r)}
    baseline_by_id = {r["question_id"]: choices_by_run(r) for r in baseline if succeeded(r)}
    result = []
    for index in range(runs):
        common = [
            q for q in method_by_id
            if q in baseline_by_id and index in method_by_id[q] and index in baseline_by_id[q]
        ]
        method_mean = _mean([throughput(method_by_id[q][index]) for q in common])
        baseline_mean = _mean([throughput(baseline_by_id[q][index]) for q in common])
        ok = not math.isnan(method_mean) and baseline_mean > 0
        result.append(method_mean / baseline_mean if ok else math.nan)
    return result


def leviathan_bound(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Leviathan et al.'s expected speedup (1 − α^(γ+1)) / ((1 − α)(γc + 1)); α = 1 is the limit."""
    if math.isclose(alpha, 1.0):
        expected_tokens = gamma + 1.0
    else:
        expected_tokens = (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
    return expected_tokens / (gamma * cost_ratio + 1.0)


def step_costs(profile: list[dict], name: str, options: dict) -> StepCosts | None:
    """A method's step costs from profile rows (bench.profile.read_profile), through the method's
    own `step_costs` hook; None when the profile lacks what the method needs, the method does not
    draft, or it is not registered here."""
    registry = methods.available()
    if name not in registry:
        return None
    return registry[name].step_costs(ProfileTable(profile), options)


# ---------------------------------------------------------------------------------------------
# The summary table


def _lossless_values(records: list[dict], label: str) -> list[str]:
    """Each succeeded question's verdict from choice 0; vanilla is identical to itself."""
    values = []
    for record in filter(succeeded, records):
        verdict = record["choices"][0].get("lossless")
        if verdict is None and label == BASELINE:
            verdict = "identical"
        if verdict is not None:
            values.append(verdict)
    return values


def _row(run: Run, label: str, category: str, records: list[dict], baseline: list[dict]) -> dict:
    """One summary row from the records of one method in one report category."""
    runs = run_count(run)
    stats = run.stats.get(label, {})
    row = dict.fromkeys(SUMMARY_COLUMNS, math.nan)
    row.update(model=run.config.get("model", ""), method=label, category=category, runs=runs)
    for key in ("trained_params", "extra_memory_bytes", "peak_memory_bytes"):
        row[key] = stats.get(key)
    done = [] if is_skipped(run, label) else [r for r in records if succeeded(r)]
    row["questions"] = len(done)
    if not done:
        row["near_ties"] = row["diverged"] = None
        return row
    choices = [c for r in done for c in r["choices"]]
    row["new_tokens_mean"] = _mean([float(sum(c.get("new_tokens", []))) for c in choices])
    row["tokens_per_s"] = _mean([throughput(c) for c in choices])
    speedups = speedups_by_run(done, baseline, runs)
    valid = [s for s in speedups if not math.isnan(s)]
    row["speedup"] = float(np.mean(valid)) if valid else math.nan
    row["speedup_std"] = float(np.std(valid, ddof=1)) if len(valid) > 1 else math.nan
    accept_lengths = [a for c in choices for a in c.get("accept_lengths", [])]
    row["mean_accepted_tokens"] = float(np.mean(accept_lengths)) if accept_lengths else math.nan
    accepted, proposed = acceptance_counts(done)
    row["acceptance_rate"] = accepted / proposed if proposed else math.nan
    verdicts = [] if temperature(run) else _lossless_values(done, label)  # sampled: no token identity
    row["lossless"] = verdicts.count("identical") / len(verdicts) if verdicts else math.nan
    row["near_ties"] = verdicts.count("near_tie") if verdicts else None
    row["diverged"] = verdicts.count("diverged") if verdicts else None
    return row


def baseline_label(run: Run) -> str | None:
    """The label speedups are measured against: `vanilla`, or a label whose method is vanilla."""
    if BASELINE in run.answers:
        return BASELINE
    for label, spec in run.config.get("methods", {}).items():
        if spec.get("name") == BASELINE and label in run.answers:
            return label
    return None


def summarize(run: Run) -> pd.DataFrame:
    """One row per (method label, report category) plus `overall`, columns SUMMARY_COLUMNS."""
    categories = report_categories(run)
    baseline_all = run.answers.get(baseline_label(run) or "", [])
    rows = []
    for label in method_labels(run):
        records = run.answers.get(label, [])
        for category in categories:
            chosen = [r for r in records if in_category(r, category)]
            baseline = [r for r in baseline_all if in_category(r, category)]
            rows.append(_row(run, label, category, chosen, baseline))
        in_any = [r for r in records if any(in_category(r, c) for c in categories)]
        baseline = [r for r in baseline_all if any(in_category(r, c) for c in categories)]
        rows.append(_row(run, label, OVERALL, in_any, baseline))
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    for column in INTEGER_COLUMNS:
        table[column] = pd.array(
            [None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
             for v in table[column]],
            dtype="Int64",
        )
    text_columns = ["model", "method", "category"]
    float_columns = [c for c in SUMMARY_COLUMNS if c not in INTEGER_COLUMNS + text_columns]
    table[float_columns] = table[float_columns].astype(float)
    return table


def errors(run: Run) -> list[tuple[str, object, str]]:
    """(label, question_id, error) for every question that failed, in label then file order."""
    return [
        (label, record["question_id"], str(record["error"]))
        for label in method_labels(run)
        for record in run.answers.get(label, [])
        if record.get("error")
    ]


def latency_breakdown(run: Run) -> pd.DataFrame:
    """Per method: mean prefill time (to the first new token) and mean time per later token,
    over every turn whose method measured its prefill. Columns: method, turns, prefill_ms,
    per_token_ms. Methods that do not measure prefill are left out."""
    rows = []
    for label in method_labels(run):
        prefill, per_token = [], []
        for record in run.answers.get(label, []):
            for choice in record.get("choices", []):
                times = zip(choice.get("prefill_time", []), choice["wall_time"], choice["new_tokens"])
                for first, wall, tokens in times:
                    if first is None:
                        continue
                    prefill.append(first)
                    if tokens > 1:
                        per_token.append((wall - first) / (tokens - 1))
        if prefill:
            rows.append({"method": label, "turns": len(prefill), "prefill_ms": 1000 * _mean(prefill),
                         "per_token_ms": 1000 * _mean(per_token) if per_token else math.nan})
    return pd.DataFrame(rows, columns=["method", "turns", "prefill_ms", "per_token_ms"])
