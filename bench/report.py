"""Tables and plots of a run directory: summary.csv, summary.md, summary.tex and figures/*.png.

`write_report(run_dir)` loads the run (bench.metrics), computes the summary table and writes
everything next to the answers. Figures are drawn on matplotlib's Agg canvas directly, without
pyplot, so the report never touches global plotting state.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.drafts import acceptance_counts
from bench.errors import UserError
from bench.metrics import (OVERALL, SUMMARY_COLUMNS, Run, errors, is_skipped, latency_breakdown, load_run, rule,
                           step_costs, succeeded, summarize, temperature, vllm_acceptance)

# Decimals kept in summary.csv for each float column.
CSV_DECIMALS = {
    "new_tokens_mean": 2, "tokens_per_s": 3, "speedup": 4, "speedup_std": 4,
    "mean_accepted_tokens": 4, "acceptance_rate": 4, "lossless": 4,
}
DISPLAY_NAMES = {
    "mt_bench": "MT-bench", "translation": "Translation", "summarization": "Summarization",
    "qa": "QA", "math_reasoning": "Math", "rag": "RAG", OVERALL: "Overall",
}
LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def write_report(run_dir) -> pd.DataFrame:
    """Write summary.csv, summary.md, summary.tex and figures/ into run_dir; return the table."""
    directory = Path(run_dir)
    run = load_run(directory)
    table = summarize(run)
    if table.empty:
        raise UserError(f"{directory}: no method to report")
    profile = None
    if (directory / "profile.csv").exists():
        from bench.profile import read_profile
        profile = read_profile(directory / "profile.csv")
    write_csv(table, directory / "summary.csv")
    (directory / "summary.md").write_text(markdown_report(run, table, profile), encoding="utf-8")
    (directory / "summary.tex").write_text(latex_table(run, table), encoding="utf-8")
    figures = directory / "figures"
    figures.mkdir(exist_ok=True)
    plot_speedup(run, table, figures / "speedup.png")
    plot_mean_accepted_tokens(run, table, figures / "mean_accepted_tokens.png")
    plot_overhead(run, table, figures / "overhead.png")
    if profile is not None:
        plot_speedup_vs_tau(run, table, profile, figures / "speedup_vs_tau.png")
    return table


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """summary.csv: the exact header, floats rounded, unknown values empty."""
    rounded = table[SUMMARY_COLUMNS].copy()
    for column, decimals in CSV_DECIMALS.items():
        rounded[column] = rounded[column].round(decimals)
    rounded.to_csv(path, index=False, na_rep="")


# ---------------------------------------------------------------------------------------------
# Formatting helpers


def display_name(category: str) -> str:
    return DISPLAY_NAMES.get(category, category)


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(character, character) for character in str(text))


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _number(value, decimals: int, suffix: str = "") -> str:
    return "–" if _missing(value) else f"{value:.{decimals}f}{suffix}"


def _speedup_text(row, runs: int, times: str = "×") -> str:
    if _missing(row["speedup"]):
        return "–"
    text = f"{row['speedup']:.2f}"
    if runs > 1 and not _missing(row["speedup_std"]):
        text += f" ± {row['speedup_std']:.2f}"
    return text + times


def _scaled(value, scale: float, decimals: int) -> str:
    return "–" if _missing(value) else f"{value / scale:.{decimals}f}"


def _shown_methods(run: Run, table: pd.DataFrame) -> list[str]:
    """Methods that ran (not skipped), in table order."""
    labels = list(dict.fromkeys(table["method"]))
    return [label for label in labels if not is_skipped(run, label)]


def _categories(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["category"]))


def _hardware(config: dict) -> str | None:
    hardware = config.get("environment", {}).get("hardware")
    if isinstance(hardware, dict):
        return ", ".join(f"{key}: {value}" for key, value in hardware.items())
    return None if hardware is None else str(hardware)


# ---------------------------------------------------------------------------------------------
# Markdown


def markdown_report(run: Run, table: pd.DataFrame, profile: list[dict] | None = None) -> str:
    """The human-readable summary: settings, the table, skipped methods, failures, lossless notes,
    and with a step-cost profile (profile.csv rows) where each drafting method's time goes."""
    config = run.config
    runs = int(table["runs"].max()) if table["runs"].notna().any() else 1
    lines = [f"# Spec-Bench results: {config.get('model', 'unknown model')}", ""]
    settings = [
        ("device", config.get("device")), ("dtype", config.get("dtype")),
        ("matmul", _matmul_text(config)), ("max_new_tokens", config.get("max_new_tokens")),
        ("runs", config.get("runs")), ("temperature", config.get("temperature")), ("seed", config.get("seed")),
        ("hardware", _hardware(config)),
    ]
    lines += [f"- {name}: {value}" for name, value in settings if value is not None]
    lines += [
        "",
        "Speedup = mean throughput ÷ vanilla's mean throughput on the same questions in this run "
        "(a ratio of means, as Spec-Bench's speed.py)"
        + ("; ± is the sample standard deviation over runs." if runs > 1 else ".")
        + " τ = mean accepted tokens per target forward pass (vanilla = 1.00).",
        "",
    ]
    header = [
        "Method", "Category", "Questions", "Speedup", "τ", "Acceptance", "Tokens/s", "Lossless",
        "Trained params (M)", "Extra memory (MB)", "Peak memory (MB)",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shown = set(_shown_methods(run, table))
    for _, row in table.iterrows():
        if row["method"] not in shown:
            continue
        cells = [
            row["method"], row["category"], str(row["questions"]), _speedup_text(row, runs),
            _number(row["mean_accepted_tokens"], 2), _percent(row["acceptance_rate"]),
            _number(row["tokens_per_s"], 2), _percent(row["lossless"]),
            _scaled(row["trained_params"], 1e6, 2), _scaled(row["extra_memory_bytes"], 1e6, 1),
            _scaled(row["peak_memory_bytes"], 1e6, 1),
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += _latency_section(run)
    lines += _acceptance_section(run, table) + _step_cost_section(run, table, profile) + _rules_section(run, table)
    lines += _skipped_section(run, table) + _failures_section(run) + _lossless_section(run, table)
    return "\n".join(lines) + "\n"


def _acceptance_section(run: Run, table: pd.DataFrame) -> list[str]:
    """Per method, over all its questions: vLLM's speculative decoding metrics (bench/drafts.py)."""
    rows = []
    for label in _shown_methods(run, table):
        stats = vllm_acceptance(run.answers.get(label, []))
        if not stats["drafting steps"]:
            continue
        positions = ", ".join(f"{rate:.2f}" for rate in stats["accepted tokens per position"][:8])
        rows.append(f"| {label} | {_percent(stats['draft acceptance rate'])} | "
                    f"{_number(stats['mean acceptance length'], 2)} | {positions} |")
    if not rows:
        return []
    return ["", "## Draft acceptance (vLLM's metrics)", "",
            "Draft acceptance rate = accepted ÷ proposed drafts; mean acceptance length = 1 + accepted drafts ÷ "
            "steps that drafted; accepted tokens per position i = steps that accepted more than i drafts ÷ steps "
            "that proposed more than i (the first 8 positions).", "",
            "| Method | Draft acceptance rate | Mean acceptance length | Accepted tokens per position |",
            "|---|---|---|---|"] + rows


def _step_cost_section(run: Run, table: pd.DataFrame, profile: list[dict] | None) -> list[str]:
    """Per drafting method, from the profile's step costs at the method's options: the speedup that
    Leviathan's bound gives at the run's overall τ, the same with the measured verification, and the
    measured speedup; the gaps say whether the verification or everything else costs the speed."""
    if not profile:
        return []
    overall = table[table["category"] == OVERALL].set_index("method")
    rows, step_ms = [], None
    for label in _shown_methods(run, table):
        if label not in overall.index or _missing(overall.at[label, "mean_accepted_tokens"]):
            continue
        entry = run.config.get("methods", {}).get(label, {})
        costs = step_costs(profile, entry.get("name", label), entry.get("effective_options") or entry.get("options", {}))
        if costs is None:
            continue
        tau, step_ms = float(overall.at[label, "mean_accepted_tokens"]), costs.step_ms
        records = run.answers.get(label, [])
        _, drafted = acceptance_counts(records)
        steps = sum(len(c.get("accept_lengths", [])) for r in filter(succeeded, records) for c in r["choices"])
        rows.append(f"| {label} | {costs.gamma} | {_number(drafted / steps if steps else None, 2)} | "
                    f"{costs.draft_ms:.1f} | {costs.verify_ms:.1f} "
                    f"({costs.verify_ms / costs.step_ms:.2f}) | {tau:.2f} | {costs.leviathan(tau):.2f}× | "
                    f"{costs.measured(tau):.2f}× | {_number(overall.at[label, 'speedup'], 2, '×')} |")
    if not rows:
        return []
    return ["", "## Where the time goes", "",
            f"From this run's step-cost profile (profile.csv, smallest profiled context): one target step, a "
            f"forward over one token, costs {step_ms:.1f} ms. Per drafting method at its options: γ = tokens drafted "
            "per step at most (a tree's depth), the drafts it proposed per target forward in this run, the time "
            "to draft γ tokens, the forward that verifies them (÷ one step), and the speedup three ways at the "
            "run's overall τ: Leviathan's bound τ ÷ (γc + 1), where verification costs one step; the same with "
            "the measured verification, τ · step ÷ (draft + verify); and the measured speedup. The first gap is "
            "what a verification that is not flat costs. The bounds charge every step a full draft and "
            "verification; a method that drafts fewer than γ (Kangaroo's early exit, PLD without a match) pays "
            "less, so its measured speedup can pass them, and longer contexts and bookkeeping, which the "
            "profile leaves out, pull the other way.", "",
            "| Method | γ | Drafts per step | Draft (ms) | Verify (ms, ÷ step) | τ | Leviathan bound | "
            "With measured verify | Measured |",
            "|---|---|---|---|---|---|---|---|---|"] + rows


def _rules_section(run: Run, table: pd.DataFrame) -> list[str]:
    """At temperature > 0: each method's acceptance rule, and why the lossless columns are empty."""
    if not temperature(run):
        return []
    lines = ["", f"## Acceptance rules (sampling at temperature {temperature(run):g})", "",
             "Tokens are drawn from softmax(logits / T), so no method can match vanilla token for token and the "
             "Lossless column is empty. `exact`: the method keeps the target's distribution exactly (speculative "
             "sampling's ratio test and residual, or the multi-round rule for deterministic drafts; checked by "
             "distribution tests); `typical`: Medusa's typical acceptance, which does not (lossy).", "",
             "| Method | Rule |", "|---|---|"]
    lines += [f"| {label} | {rule(run, label)} |" for label in _shown_methods(run, table)]
    return lines


def _matmul_text(config: dict) -> str | None:
    requested, resolved = config.get("matmul"), (config.get("environment") or {}).get("matmul_resolved")
    return f"{requested} (resolved: {resolved})" if resolved and resolved != requested else requested


def _percent(value) -> str:
    return "–" if _missing(value) else f"{100 * value:.1f}%"


def _latency_section(run: Run) -> list[str]:
    latency = latency_breakdown(run)
    if latency.empty:
        return []
    lines = ["", "## Latency", "", "Prefill = time to the first new token (prompt forward included); "
             "per token = the rest of the turn's time ÷ its remaining tokens. Means over turns.", "",
             "| Method | Turns | Prefill (ms) | Per token (ms) |", "|---|---|---|---|"]
    for _, row in latency.iterrows():
        lines.append(f"| {row['method']} | {row['turns']} | {_number(row['prefill_ms'], 1)} | "
                     f"{_number(row['per_token_ms'], 1)} |")
    return lines


def _skipped_section(run: Run, table: pd.DataFrame) -> list[str]:
    skipped = [label for label in dict.fromkeys(table["method"]) if is_skipped(run, label)]
    if not skipped:
        return []
    lines = ["", "## Skipped methods", ""]
    for label in skipped:
        reason = run.stats.get(label, {}).get("reason") or "no reason recorded"
        lines.append(f"- {label}: {reason}")
    return lines


def _failures_section(run: Run) -> list[str]:
    failures = errors(run)
    if not failures:
        return []
    lines = ["", "## Failed questions", "", "These are left out of every number above.", ""]
    lines += [f"- {label}, question {question_id}: {error}" for label, question_id, error in failures]
    return lines


def _lossless_section(run: Run, table: pd.DataFrame) -> list[str]:
    """List near ties and diverged questions per method (from choice 0's verdict)."""
    lines = []
    for label in _shown_methods(run, table):
        verdicts: dict[str, list] = {"near_tie": [], "diverged": []}
        for record in run.answers.get(label, []):
            if record.get("choices") and not record.get("error"):
                verdict = record["choices"][0].get("lossless")
                if verdict in verdicts:
                    verdicts[verdict].append(record["question_id"])
        for verdict, ids in verdicts.items():
            if ids:
                lines.append(f"- {label}: {len(ids)} {verdict.replace('_', ' ')} "
                             f"question(s): {', '.join(map(str, ids))}")
    if not lines:
        return []
    return [
        "", "## Lossless check", "",
        "A near tie parts from vanilla where vanilla's top-2 logits nearly tie (floating-point "
        "order, allowed); diverged means a difference elsewhere, which is a bug.", "",
    ] + lines


# ---------------------------------------------------------------------------------------------
# LaTeX


def latex_table(run: Run, table: pd.DataFrame) -> str:
    """A booktabs table: methods as rows, categories as column pairs (speedup, τ)."""
    categories = _categories(table)
    runs = int(table["runs"].max()) if table["runs"].notna().any() else 1
    lines = [
        "% Generated by `python -m bench report`; needs \\usepackage{booktabs}.",
        "\\begin{tabular}{l" + "rr" * len(categories) + "}",
        "\\toprule",
        "Method & " + " & ".join(
            f"\\multicolumn{{2}}{{c}}{{{latex_escape(display_name(c))}}}" for c in categories
        ) + " \\\\",
        " ".join(f"\\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(categories))),
        " & " + " & ".join("Speedup & $\\tau$" for _ in categories) + " \\\\",
        "\\midrule",
    ]
    for label in _shown_methods(run, table):
        rows = table[table["method"] == label].set_index("category")
        cells = [latex_escape(label)]
        for category in categories:
            row = rows.loc[category]
            speedup = _speedup_text(row, runs, times="$\\times$").replace("±", "$\\pm$")
            cells += [speedup.replace("–", "--"), _number(row["mean_accepted_tokens"], 2).replace("–", "--")]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    model = latex_escape(run.config.get("model", ""))
    caption = f"% Speedup over vanilla and mean accepted tokens $\\tau$ on Spec-Bench, {model}."
    return "\n".join([caption] + lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures


def _new_figure(width: float = 8.0, height: float = 4.5) -> tuple[Figure, object]:
    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def _grouped_bars(axes, table: pd.DataFrame, methods: list[str], value: str, error: str | None):
    """Bars of `value` per category (x) and method (colour), with optional error bars."""
    categories = _categories(table)
    positions = np.arange(len(categories))
    width = 0.8 / max(len(methods), 1)
    for number, label in enumerate(methods):
        rows = table[table["method"] == label].set_index("category").reindex(categories)
        heights = rows[value].to_numpy(dtype=float)
        errors_ = rows[error].to_numpy(dtype=float) if error else None
        if errors_ is not None and np.isnan(errors_).all():
            errors_ = None
        axes.bar(positions + (number - (len(methods) - 1) / 2) * width, np.nan_to_num(heights),
                 width, yerr=None if errors_ is None else np.nan_to_num(errors_),
                 capsize=3, label=label)
    axes.set_xticks(positions, [display_name(c) for c in categories])
    if methods:
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_speedup(run: Run, table: pd.DataFrame, path: Path) -> None:
    """Grouped bars of speedup per category and method; a dashed line marks vanilla's 1.0."""
    figure, axes = _new_figure()
    runs = int(table["runs"].max()) if table["runs"].notna().any() else 1
    _grouped_bars(axes, table, _shown_methods(run, table), "speedup",
                  "speedup_std" if runs > 1 else None)
    axes.axhline(1.0, color="black", linestyle="--", linewidth=1)
    axes.set_ylabel("speedup over vanilla" + (f" (mean ± std, {runs} runs)" if runs > 1 else ""))
    axes.set_title(f"Spec-Bench speedup: {run.config.get('model', '')}")
    figure.tight_layout()
    figure.savefig(path)


def plot_mean_accepted_tokens(run: Run, table: pd.DataFrame, path: Path) -> None:
    """Grouped bars of τ (mean accepted tokens per target forward) per category and method."""
    figure, axes = _new_figure()
    _grouped_bars(axes, table, _shown_methods(run, table), "mean_accepted_tokens", None)
    axes.axhline(1.0, color="black", linestyle="--", linewidth=1)
    axes.set_ylabel("mean accepted tokens τ")
    axes.set_title(f"Mean accepted tokens per target forward: {run.config.get('model', '')}")
    figure.tight_layout()
    figure.savefig(path)


def plot_overhead(run: Run, table: pd.DataFrame, path: Path) -> None:
    """Two bar panels per method: trained parameters (M) and extra memory (MB); n/a if unknown."""
    figure = Figure(figsize=(9.0, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    methods = _shown_methods(run, table)
    overall = table[table["category"] == OVERALL].set_index("method").reindex(methods)
    panels = [("trained_params", 1e6, "trained parameters (M)"),
              ("extra_memory_bytes", 1e6, "extra memory (MB)")]
    for number, (column, scale, title) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 2, number)
        values = overall[column].astype("Float64").to_numpy(dtype=float, na_value=np.nan) / scale
        bars = axes.bar(np.arange(len(methods)), np.nan_to_num(values))
        for bar, value in zip(bars, values):
            axes.annotate("n/a" if np.isnan(value) else f"{value:.3g}",
                          (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
        axes.set_ylim(0, max(float(np.nanmax(values, initial=0.0)) * 1.15, 1.0))
        axes.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        axes.set_title(title)
    figure.suptitle(f"Method overhead: {run.config.get('model', '')}")
    figure.tight_layout()
    figure.savefig(path)


def plot_speedup_vs_tau(run: Run, table: pd.DataFrame, profile: list[dict], path: Path) -> None:
    """Measured speedup against τ per method and category, with two lines per drafting method drawn
    from the run's profile: Leviathan's bound τ / (γc + 1), where verification costs one step, and
    the same with the measured cost of the verify forward, which is where the bound is lost."""
    figure, axes = _new_figure()
    for number, label in enumerate(_shown_methods(run, table)):
        if label == "vanilla":
            continue
        color = f"C{number % 10}"
        rows = table[(table["method"] == label) & (table["category"] != OVERALL)]
        axes.scatter(rows["mean_accepted_tokens"], rows["speedup"], color=color, s=18, label=label)
        overall = table[(table["method"] == label) & (table["category"] == OVERALL)]
        if not overall.empty:
            axes.scatter(overall["mean_accepted_tokens"], overall["speedup"], color=color, marker="*", s=120)
        entry = run.config.get("methods", {}).get(label, {})
        costs = step_costs(profile, entry.get("name", label), entry.get("effective_options") or entry.get("options", {}))
        if costs is None:
            continue
        taus = np.linspace(1.0, costs.gamma + 1.0, 50)
        axes.plot(taus, [costs.leviathan(t) for t in taus], "--", color=color, linewidth=1,
                  label=f"{label}: Leviathan, c={costs.cost_ratio:.2f}, γ={costs.gamma}")
        axes.plot(taus, [costs.measured(t) for t in taus], ":", color=color, linewidth=1.5,
                  label=f"{label}: with measured verify cost")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("mean accepted tokens τ")
    axes.set_ylabel("speedup over vanilla")
    axes.set_title(f"Speedup vs τ (dots: categories, stars: overall): {run.config.get('model', '')}")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path)
