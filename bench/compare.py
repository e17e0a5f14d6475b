"""`python -m bench compare BASELINE NEW`: did a method get slower or less accurate?

Each side is a run directory (its summary.csv, written by `report` if missing, and config.json) or
a summary.csv file (config.json beside it is used when present). For every (method, category) row
of the baseline:

- mean accepted tokens (τ) must not fall by more than the `tau` tolerance (relative). Greedy
  decoding on the same hardware is deterministic, so the default is tight;
- the lossless fraction must not fall, and the count of diverged questions must not rise;
- speedup must not fall by more than the `speedup` tolerance (relative). Timing varies from run to
  run and machine to machine, so a speedup drop counts as a regression only with `--strict` or when
  both runs name the same hardware; otherwise it is a warning;
- the row must exist in NEW, with the summary header of the file contract (schema).

With `--speedup-min-questions N`, a speedup drop on a row measured on fewer than N questions (in
either run) is only warned about: one question's timing is at the mercy of a host whose speed
drifts, while a slower method shows on its overall row too.

Exit status: 0 nothing regressed, 1 a regression, 2 unusable input (unreadable files, different
run configs: these are listed and nothing is compared unless `--ignore-config` is given).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

import methods
from bench.errors import UserError
from bench.metrics import SUMMARY_COLUMNS

# Relative tolerances. τ: greedy decoding repeats itself exactly on the same machine, so 1% only
# absorbs a rare floating-point near tie. speedup: 20%, twice the largest per-category relative
# standard deviation over the 3 runs of results/reference (8.6%; overall rows at most 3%), rounded
# up; smaller sweeps are noisier (make regress passes its own, wider tolerance: README, "Comparing runs").
DEFAULT_TOLERANCES = {"tau": 0.01, "speedup": 0.20}
# Settings that must agree for two runs to be comparable (the environment section may differ).
CONFIG_FIELDS = ("model", "family", "template", "device", "dtype", "matmul", "categories", "limit",
                 "max_new_tokens", "runs", "temperature", "seed", "order")
CONFIG_DEFAULTS = {"order": "method"}  # fields a config leaves out at their default
EXIT_OK, EXIT_REGRESSION, EXIT_UNUSABLE = 0, 1, 2


@dataclass
class Side:
    """One side of a comparison: its summary table and, when found, its config."""

    source: Path
    table: pd.DataFrame
    config: dict | None
    header_ok: bool = True


@dataclass
class Finding:
    method: str
    category: str
    metric: str
    baseline: float | str
    new: float | str
    verdict: str  # "REGRESSION", "warning", "improved", "moved"

    def change(self) -> str:
        if isinstance(self.baseline, str) or isinstance(self.new, str):
            return ""
        if _missing(self.baseline) or _missing(self.new) or self.baseline == 0:
            return ""
        return f"{100 * (self.new / self.baseline - 1):+.1f}%"


@dataclass
class Comparison:
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows_compared: int = 0
    speedup_enforced: bool = False

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == "REGRESSION"]


def parse_tolerances(text: str | None) -> dict[str, float]:
    """'tau=0.01,speedup=0.10' -> {'tau': 0.01, 'speedup': 0.1}, over the defaults."""
    tolerances = dict(DEFAULT_TOLERANCES)
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in tolerances:
            raise UserError(f"bad --tolerance item {item!r}: use KEY=VALUE with KEY one of "
                            f"{', '.join(DEFAULT_TOLERANCES)}, e.g. tau=0.01,speedup=0.20")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"--tolerance {key}={value!r}: not a number") from None
        if not 0 <= number < 1:
            raise UserError(f"--tolerance {key}={number}: a relative tolerance in [0, 1), e.g. 0.10 for 10%")
        tolerances[key] = number
    return tolerances


def load_side(path_text: str) -> Side:
    path = Path(path_text)
    if path.is_dir():
        summary, config_path = path / "summary.csv", path / "config.json"
        if not summary.exists():
            if not config_path.exists():
                raise UserError(f"{path} has neither summary.csv nor config.json: not a run directory")
            from bench.report import write_report
            write_report(path)
    elif path.is_file():
        summary, config_path = path, path.with_name("config.json")
    else:
        raise UserError(f"{path} does not exist: give a run directory or a summary.csv")
    try:
        table = pd.read_csv(summary, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{summary}: not a readable summary.csv ({error})") from None
    header_ok = list(table.columns) == SUMMARY_COLUMNS
    if not {"method", "category"} <= set(table.columns):
        raise UserError(f"{summary}: no method/category columns; expected the header {','.join(SUMMARY_COLUMNS)}")
    config = None
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{config_path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    return Side(summary, table, config, header_ok)


def config_differences(baseline: dict | None, new: dict | None) -> list[str]:
    """What differs between two run configs in a way that makes their numbers incomparable."""
    if baseline is None or new is None:
        return []
    def value(config: dict, name: str):
        return config.get(name, CONFIG_DEFAULTS.get(name))
    differences = [f"{name}: {value(baseline, name)!r} vs {value(new, name)!r}"
                   for name in CONFIG_FIELDS if value(baseline, name) != value(new, name)]
    old_sha = (baseline.get("questions") or {}).get("sha256")
    new_sha = (new.get("questions") or {}).get("sha256")
    if old_sha != new_sha:
        differences.append(f"questions sha256: {str(old_sha)[:12]} vs {str(new_sha)[:12]}")
    old_methods, new_methods = baseline.get("methods", {}), new.get("methods", {})
    for label in sorted(set(old_methods) & set(new_methods)):
        for key in ("options", "effective_options", "checkpoints"):
            old_value, new_value = old_methods[label].get(key), new_methods[label].get(key)
            if key == "checkpoints" and isinstance(old_value, dict) and isinstance(new_value, dict):
                old_value, new_value = sorted(old_value.values()), sorted(new_value.values())  # hashes, not paths
            if key != "checkpoints" and isinstance(old_value, dict) and isinstance(new_value, dict):
                name = new_methods[label].get("name") or old_methods[label].get("name") or label.split("+")[0]
                old_value, new_value = _without_added_defaults(name, old_value, new_value)
            if old_value is not None and new_value is not None and old_value != new_value:
                differences.append(f"methods[{label}].{key}: {old_value} vs {new_value}")
    return differences


def _without_added_defaults(name: str | None, old: dict, new: dict) -> tuple[dict, dict]:
    """Both option dicts without the options that only one side records at the method's declared
    default: an option added after the other run was made, whose default keeps the behaviour that
    run had, does not make the two incomparable (a non-default value, or an unknown method, does)."""
    try:
        declared = methods.get(name).options if name else {}
    except KeyError:
        declared = {}

    def added_default(key: str, value) -> bool:
        return key in declared and value in (None, declared[key].default)

    old = {k: v for k, v in old.items() if k in new or not added_default(k, v)}
    new = {k: v for k, v in new.items() if k in old or not added_default(k, v)}
    return old, new


def hardware_name(config: dict | None) -> str | None:
    """The machine a run's speedups belong to: its processor, cores and the product path `--matmul`
    resolved to there (a path is a property of the machine, like its CPU)."""
    if not config:
        return None
    environment = config.get("environment") or {}
    hardware = environment.get("hardware") or {}
    if not hardware.get("name"):
        return None
    path = environment.get("matmul_resolved") or config.get("matmul")
    return f"{hardware['name']} ({hardware.get('cpu_count', '?')} cores" + (f", {path} products)" if path else ")")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def compare_tables(baseline: Side, new: Side, tolerances: dict[str, float], strict: bool = False,
                   speedup_min_questions: int = 1) -> Comparison:
    result = Comparison()
    base_hw, new_hw = hardware_name(baseline.config), hardware_name(new.config)
    result.speedup_enforced = strict or (base_hw is not None and base_hw == new_hw)
    if strict:
        result.notes.append("speedup enforced (--strict)")
    elif result.speedup_enforced:
        result.notes.append(f"speedup enforced: both runs on {base_hw}")
    else:
        result.notes.append(f"speedup only warned about: hardware {base_hw or 'unknown'} vs {new_hw or 'unknown'} "
                            "(use --strict to enforce)")
    if not new.header_ok:
        result.findings.append(Finding("*", "*", "summary header", ",".join(baseline.table.columns),
                                       ",".join(new.table.columns), "REGRESSION"))
    new_rows = {(str(r["method"]), str(r["category"])): r for _, r in new.table.iterrows()}
    base_keys = set()
    for _, row in baseline.table.iterrows():
        key = (str(row["method"]), str(row["category"]))
        base_keys.add(key)
        other = new_rows.get(key)
        if other is None:
            result.findings.append(Finding(*key, "row", "present", "missing", "REGRESSION"))
            continue
        result.rows_compared += 1
        questions = min(get_questions(row), get_questions(other))
        enforced = result.speedup_enforced and questions >= speedup_min_questions
        result.findings.extend(_compare_row(key, row, other, tolerances, enforced))
    for key in sorted(set(new_rows) - base_keys):
        result.notes.append(f"new row not in the baseline: {key[0]} / {key[1]}")
    return result


def get_questions(row) -> float:
    """The questions a summary row was measured on (0 when the column is missing or empty)."""
    value = _number(row["questions"]) if "questions" in row.index else math.nan
    return 0 if _missing(value) else value


def _compare_row(key, row, other, tolerances, speedup_enforced) -> list[Finding]:
    findings = []
    method, category = key

    def get(record, column):
        return _number(record[column]) if column in record.index else math.nan

    # mean accepted tokens: deterministic under greedy decoding on the same hardware
    old, new = get(row, "mean_accepted_tokens"), get(other, "mean_accepted_tokens")
    if not _missing(old):
        if _missing(new):
            findings.append(Finding(method, category, "τ", old, "missing", "REGRESSION"))
        elif new < old * (1 - tolerances["tau"]):
            findings.append(Finding(method, category, "τ", old, new, "REGRESSION"))
        elif new > old * (1 + tolerances["tau"]):
            findings.append(Finding(method, category, "τ", old, new, "improved"))
    # losslessness: the identical fraction must not drop, diverged questions must not appear
    old, new = get(row, "lossless"), get(other, "lossless")
    if not _missing(old):
        if _missing(new) or new < old - 1e-9:
            findings.append(Finding(method, category, "lossless", old, "missing" if _missing(new) else new,
                                    "REGRESSION"))
        elif new > old + 1e-9:
            findings.append(Finding(method, category, "lossless", old, new, "improved"))
    old, new = get(row, "diverged"), get(other, "diverged")
    if not _missing(new) and new > (0 if _missing(old) else old):
        findings.append(Finding(method, category, "diverged", old, new, "REGRESSION"))
    # speedup: timing noise; enforced only on the same hardware or with --strict
    old, new = get(row, "speedup"), get(other, "speedup")
    if not _missing(old) and method != "vanilla":
        if _missing(new):
            findings.append(Finding(method, category, "speedup", old, "missing", "REGRESSION"))
        elif new < old * (1 - tolerances["speedup"]):
            findings.append(Finding(method, category, "speedup", old, new,
                                    "REGRESSION" if speedup_enforced else "warning"))
        elif new > old * (1 + tolerances["speedup"]):
            findings.append(Finding(method, category, "speedup", old, new, "improved"))
    return findings


def _format(value) -> str:
    if isinstance(value, str):
        return value
    if _missing(value):
        return "–"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"


def render(comparison: Comparison, tolerances: dict[str, float]) -> str:
    lines = []
    if comparison.findings:
        header = ("method", "category", "metric", "baseline", "new", "change", "verdict")
        rows = [(f.method, f.category, f.metric, _format(f.baseline), _format(f.new), f.change(), f.verdict)
                for f in sorted(comparison.findings, key=lambda f: (f.verdict != "REGRESSION", f.method, f.category))]
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
        for cells in (header, tuple("-" * w for w in widths), *rows):
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    else:
        lines.append("nothing moved beyond the tolerances")
    lines.append("")
    lines.extend(comparison.notes)
    regressions = len(comparison.regressions)
    warnings = sum(f.verdict == "warning" for f in comparison.findings)
    lines.append(f"{comparison.rows_compared} rows compared (tolerances: τ {tolerances['tau']:.0%}, speedup "
                 f"{tolerances['speedup']:.0%}): {regressions} regression(s), {warnings} warning(s)")
    return "\n".join(lines)


def compare_command(baseline_path: str, new_path: str, tolerance: str | None = None, strict: bool = False,
                    ignore_config: bool = False, out=None, speedup_min_questions: int = 1) -> int:
    """Run a comparison and print it (to `out`, default stdout); returns the exit status (0, 1 or 2)."""
    out = out or sys.stdout
    try:
        tolerances = parse_tolerances(tolerance)
        baseline, new = load_side(baseline_path), load_side(new_path)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE
    if not baseline.header_ok:
        print(f"error: the baseline {baseline.source} does not have the summary header of the file contract "
              f"({','.join(SUMMARY_COLUMNS)}); regenerate it with `python -m bench report DIR`", file=sys.stderr)
        return EXIT_UNUSABLE
    differences = config_differences(baseline.config, new.config)
    if differences:
        print("the two runs have different configs:\n  " + "\n  ".join(differences), file=out)
        if not ignore_config:
            print("nothing compared (exit 2); rerun NEW with the baseline's settings "
                  "(`python -m bench run --config BASELINE/config.json --out NEW`), or pass --ignore-config",
                  file=out)
            return EXIT_UNUSABLE
    if baseline.config is None or new.config is None:
        print("note: config.json missing on one side; configs not checked", file=out)
    comparison = compare_tables(baseline, new, tolerances, strict, speedup_min_questions)
    if speedup_min_questions > 1 and comparison.speedup_enforced:
        comparison.notes.append(f"speedup enforced on rows of at least {speedup_min_questions} questions; "
                                "smaller rows only warned about")
    print(render(comparison, tolerances), file=out)
    return EXIT_REGRESSION if comparison.regressions else EXIT_OK
