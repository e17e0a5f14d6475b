"""Tests of bench/metrics.py and bench/report.py on a small hand-built run directory.

The synthetic run: methods `vanilla` and `pld+max_ngram=3` (plus `kangaroo`, skipped), groups
mt_bench (questions 81, 82, two turns) and qa (300, 301), R = 2 runs. Throughputs (tokens/s):

    question  vanilla r0  vanilla r1   pld r0   pld r1
    81           10          10          20       20
    82           20          10          20       10
    300          10          10          (failed)
    301          20          20          40       40

mt_bench speedup: r0 = mean(20, 20) / mean(10, 20) = 4/3, r1 = 15 / 10 = 3/2 (a mean of ratios
would give 1.5 and 1.25). qa: only question 301 is common, so 40 / 20 = 2 in both runs.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench import metrics, report
from bench.errors import UserError

PLD = "pld+max_ngram=3"
CHECK_RUN = Path(__file__).resolve().parents[2] / "shared/tools/check_run.py"


def _choice(index, new_tokens, wall_time, accept_lengths=None, draft_lengths=None, lossless="identical"):
    accept_lengths = accept_lengths or [1] * sum(new_tokens)
    return {
        "index": index, "turns": [f"text {n}" for n in new_tokens],
        "decoding_steps": [len(accept_lengths)] * len(new_tokens), "new_tokens": new_tokens,
        "wall_time": wall_time, "accept_lengths": accept_lengths,
        "draft_lengths": draft_lengths or [0] * len(accept_lengths),
        "output_ids": [[7] * n for n in new_tokens], "lossless": lossless,
    }


def _record(label, question_id, category, choices, group=None, error=None):
    record = {"question_id": question_id, "category": category, "answer_id": f"a{question_id}",
              "model_id": label, "choices": choices, "tstamp": 1.0}
    if group:
        record["group"] = group
    if error:
        record["error"] = error
    return record


def _write_run(directory: Path, answers: dict, methods: dict, stats: dict, runs: int = 2,
               categories=("mt_bench", "qa")) -> Path:
    (directory / "answers").mkdir(parents=True)
    config = {"model": "gemma-3-270m", "categories": list(categories), "runs": runs,
              "max_new_tokens": 16, "methods": methods, "device": "cpu", "dtype": "float32",
              "environment": {"hardware": "test CPU, 2 cores"}}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "method_stats.json").write_text(json.dumps(stats))
    for file_label, records in answers.items():
        lines = [json.dumps(r) for r in sorted(records, key=lambda r: r["question_id"])]
        (directory / "answers" / f"{file_label}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


# pld's accept/draft lengths per question: q81 commits 10 tokens in 4 target forwards,
# q82 8 tokens in 3, q301 5 tokens in 2.
PLD_STEPS = {
    81: ([1, 3, 2, 4], [0, 4, 4, 4]),
    82: ([1, 4, 3], [0, 3, 4]),
    301: ([1, 4], [0, 5]),
}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    vanilla = [
        _record("vanilla", 81, "writing", [_choice(0, [4, 6], [0.4, 0.6]),
                                           _choice(1, [4, 6], [0.5, 0.5])], group="mt_bench"),
        _record("vanilla", 82, "writing", [_choice(0, [4, 4], [0.2, 0.2]),
                                           _choice(1, [4, 4], [0.4, 0.4])]),  # no group field
        _record("vanilla", 300, "qa", [_choice(0, [5], [0.5]), _choice(1, [5], [0.5])], "qa"),
        _record("vanilla", 301, "qa", [_choice(0, [5], [0.25]), _choice(1, [5], [0.25])], "qa"),
    ]

    def pld_choice(question_id, index, new_tokens, wall_time, lossless):
        accepts, drafts = PLD_STEPS[question_id]
        return _choice(index, new_tokens, wall_time, accepts, drafts, lossless)

    pld = [
        _record(PLD, 81, "writing", [pld_choice(81, 0, [4, 6], [0.2, 0.3], "identical"),
                                     pld_choice(81, 1, [4, 6], [0.25, 0.25], "identical")],
                "mt_bench"),
        _record(PLD, 82, "writing", [pld_choice(82, 0, [4, 4], [0.2, 0.2], "near_tie"),
                                     pld_choice(82, 1, [4, 4], [0.4, 0.4], "near_tie")],
                "mt_bench"),
        _record(PLD, 300, "qa", [], "qa", error="CUDA out of memory"),
        _record(PLD, 301, "qa", [pld_choice(301, 0, [5], [0.125], "diverged"),
                                 pld_choice(301, 1, [5], [0.125], "diverged")], "qa"),
    ]
    methods = {  # vanilla deliberately not first: the report puts it first
        PLD: {"name": "pld", "spec": PLD, "options": {"max_ngram": 3, "num_draft": 10}},
        "vanilla": {"name": "vanilla", "spec": "vanilla", "options": {}},
        "kangaroo": {"name": "kangaroo", "spec": "kangaroo", "options": {}},
    }
    stats = {
        "vanilla": {"name": "vanilla", "status": "ok", "reason": None, "trained_params": 0,
                    "extra_memory_bytes": 0, "peak_memory_bytes": None},
        PLD: {"name": "pld", "status": "ok", "reason": None, "trained_params": 0,
              "extra_memory_bytes": 2_000_000, "peak_memory_bytes": 123_456_789},
        "kangaroo": {"name": "kangaroo", "status": "skipped", "reason": "no adapter checkpoint",
                     "trained_params": 0, "extra_memory_bytes": 0, "peak_memory_bytes": None},
    }
    # The pld file name is percent-encoded differently from its label on purpose.
    return _write_run(tmp_path / "run", {"vanilla": vanilla, "pld%2Bmax_ngram%3D3": pld},
                      methods, stats)


def _row(table: pd.DataFrame, method: str, category: str) -> pd.Series:
    rows = table[(table["method"] == method) & (table["category"] == category)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_summary_shape_and_order(run_dir):
    table = metrics.summarize(metrics.load_run(run_dir))
    assert list(table.columns) == (
        "model,method,category,runs,questions,new_tokens_mean,tokens_per_s,speedup,speedup_std,"
        "mean_accepted_tokens,acceptance_rate,lossless,near_ties,diverged,trained_params,"
        "extra_memory_bytes,peak_memory_bytes").split(",")
    assert list(zip(table["method"], table["category"])) == [
        (m, c) for m in ("vanilla", PLD, "kangaroo") for c in ("mt_bench", "qa", "overall")]
    assert set(table["model"]) == {"gemma-3-270m"}
    assert set(table["runs"]) == {2}


def test_speedup_is_a_ratio_of_means_per_run(run_dir):
    table = metrics.summarize(metrics.load_run(run_dir))
    mt_bench = _row(table, PLD, "mt_bench")
    assert mt_bench["speedup"] == pytest.approx((4 / 3 + 3 / 2) / 2)  # mean of ratios: 1.375
    assert mt_bench["speedup_std"] == pytest.approx((3 / 2 - 4 / 3) / math.sqrt(2))
    qa = _row(table, PLD, "qa")  # failed question 300 is left out for both methods
    assert qa["speedup"] == pytest.approx(2.0)
    assert qa["speedup_std"] == pytest.approx(0.0)
    overall = _row(table, PLD, "overall")  # r0: 80/3 ÷ 50/3 = 1.6, r1: 70/3 ÷ 40/3 = 1.75
    assert overall["speedup"] == pytest.approx(1.675)
    assert overall["speedup_std"] == pytest.approx(0.15 / math.sqrt(2))
    vanilla = _row(table, "vanilla", "overall")
    assert (vanilla["speedup"], vanilla["speedup_std"]) == (1.0, 0.0)


def test_throughput_tokens_and_questions(run_dir):
    table = metrics.summarize(metrics.load_run(run_dir))
    assert _row(table, PLD, "qa")["questions"] == 1
    assert _row(table, "vanilla", "qa")["questions"] == 2
    assert _row(table, "vanilla", "qa")["tokens_per_s"] == pytest.approx(15.0)
    overall = _row(table, PLD, "overall")
    assert overall["questions"] == 3
    assert overall["tokens_per_s"] == pytest.approx(25.0)  # mean of 20, 20, 40, 20, 10, 40
    assert overall["new_tokens_mean"] == pytest.approx(23 / 3)


def test_accepted_tokens_and_acceptance_rate(run_dir):
    table = metrics.summarize(metrics.load_run(run_dir))
    mt_bench = _row(table, PLD, "mt_bench")
    assert mt_bench["mean_accepted_tokens"] == pytest.approx(36 / 14)
    assert mt_bench["acceptance_rate"] == pytest.approx(11 / 19)  # (2+1+3 + 3+2) / (12 + 7)
    overall = _row(table, PLD, "overall")
    assert overall["mean_accepted_tokens"] == pytest.approx(46 / 18)
    assert overall["acceptance_rate"] == pytest.approx(28 / 48)
    vanilla = _row(table, "vanilla", "overall")
    assert vanilla["mean_accepted_tokens"] == 1.0
    assert math.isnan(vanilla["acceptance_rate"])


def test_per_position_acceptance(run_dir):
    run = metrics.load_run(run_dir)
    mt_bench = [r for r in run.answers[PLD] if r["category"] == "writing"]
    # Steps (accepted drafts of proposed): 2/4, 1/4, 3/4, 3/3, 2/4.
    assert metrics.per_position_acceptance(mt_bench) == pytest.approx([1.0, 0.8, 0.4, 0.0])
    # With q301 (3 of 5): positions 0..4 proposed 6, 6, 6, 5, 1 times.
    assert metrics.per_position_acceptance(run.answers[PLD]) == pytest.approx(
        [1.0, 5 / 6, 3 / 6, 0 / 5, 0 / 1])
    assert metrics.per_position_acceptance(run.answers["vanilla"]) == []


def test_lossless_counts_and_overhead(run_dir):
    table = metrics.summarize(metrics.load_run(run_dir))
    mt_bench = _row(table, PLD, "mt_bench")
    assert (mt_bench["lossless"], mt_bench["near_ties"], mt_bench["diverged"]) == (0.5, 1, 0)
    qa = _row(table, PLD, "qa")
    assert (qa["lossless"], qa["near_ties"], qa["diverged"]) == (0.0, 0, 1)
    overall = _row(table, PLD, "overall")
    assert overall["lossless"] == pytest.approx(1 / 3)
    assert (overall["near_ties"], overall["diverged"]) == (1, 1)
    assert _row(table, "vanilla", "overall")["lossless"] == 1.0
    assert overall["extra_memory_bytes"] == 2_000_000
    assert overall["peak_memory_bytes"] == 123_456_789
    assert pd.isna(_row(table, "vanilla", "overall")["peak_memory_bytes"])


def test_skipped_method_has_empty_rows(run_dir):
    table = metrics.summarize(metrics.load_run(run_dir))
    skipped = table[table["method"] == "kangaroo"]
    assert list(skipped["category"]) == ["mt_bench", "qa", "overall"]
    assert list(skipped["questions"]) == [0, 0, 0]
    assert skipped["speedup"].isna().all() and skipped["mean_accepted_tokens"].isna().all()


def test_errors_and_corrupt_answer_line(run_dir):
    run = metrics.load_run(run_dir)
    assert metrics.errors(run) == [(PLD, 300, "CUDA out of memory")]
    with open(run_dir / "answers" / "vanilla.jsonl", "a") as handle:
        handle.write("\n{broken\n")
    with pytest.raises(UserError, match=r"vanilla\.jsonl, line 6: not valid JSON"):
        metrics.load_run(run_dir)


def test_leviathan_bound():
    assert metrics.leviathan_bound(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert metrics.leviathan_bound(0.5, 2, 0.0) == pytest.approx(1.75)
    assert metrics.leviathan_bound(1.0, 3, 0.5) == pytest.approx(4 / 2.5)
    assert metrics.leviathan_bound(1 - 1e-12, 3, 0.5) == pytest.approx(4 / 2.5)


def test_report_writes_every_file_and_passes_check_run(run_dir):
    table = report.write_report(run_dir)
    assert len(table) == 9
    header = (run_dir / "summary.csv").read_text().splitlines()[0]
    assert header == ",".join(metrics.SUMMARY_COLUMNS)
    csv = pd.read_csv(run_dir / "summary.csv")
    assert csv.loc[(csv.method == PLD) & (csv.category == "mt_bench"), "speedup"].item() == 1.4167
    assert csv.loc[csv.method == "kangaroo", "speedup"].isna().all()
    for name in ("speedup.png", "mean_accepted_tokens.png", "overhead.png"):
        png = run_dir / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (run_dir / "summary.md").read_text()
    assert "gemma-3-270m" in markdown and "test CPU, 2 cores" in markdown
    assert "1.42 ± 0.12×" in markdown
    assert "kangaroo: no adapter checkpoint" in markdown
    assert "question 300: CUDA out of memory" in markdown
    assert "1 near tie question(s): 82" in markdown and "1 diverged question(s): 301" in markdown
    assert "| kangaroo |" not in markdown
    latex = (run_dir / "summary.tex").read_text()
    assert "\\toprule" in latex and "\\bottomrule" in latex
    assert "pld+max\\_ngram=3 & 1.42 $\\pm$ 0.12$\\times$ & 2.57" in latex
    if not CHECK_RUN.is_file():
        pytest.skip(f"check_run.py is not at {CHECK_RUN}")
    result = subprocess.run([sys.executable, str(CHECK_RUN), str(run_dir)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_report_of_a_vanilla_only_run(tmp_path):
    vanilla = [_record("vanilla", 300, "qa", [_choice(0, [3], [0.1])], "qa")]
    directory = _write_run(tmp_path / "run", {"vanilla": vanilla},
                           {"vanilla": {"name": "vanilla", "spec": "vanilla", "options": {}}},
                           {}, runs=1, categories=["qa"])
    table = report.write_report(directory)
    assert list(table["category"]) == ["qa", "overall"]
    assert table["speedup"].tolist() == [1.0, 1.0]
    assert table["speedup_std"].isna().all()  # one run: no spread
    assert table["tokens_per_s"].tolist() == pytest.approx([30.0, 30.0])
    assert (directory / "figures" / "speedup.png").stat().st_size > 1000
    assert "±" not in (directory / "summary.md").read_text()


def test_report_without_answers_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no answers"):
        report.write_report(tmp_path / "empty")


def test_vllm_acceptance_metrics(run_dir):
    from bench.drafts import vllm_acceptance
    run = metrics.load_run(run_dir)
    stats = vllm_acceptance(run.answers[PLD])
    accepted, proposed = metrics.acceptance_counts(run.answers[PLD])
    assert stats["draft acceptance rate"] == pytest.approx(accepted / proposed)
    assert stats["mean acceptance length"] == pytest.approx(1 + accepted / stats["drafting steps"])
    assert stats["accepted tokens per position"] == pytest.approx(metrics.per_position_acceptance(run.answers[PLD]),
                                                                abs=1e-4)
    assert vllm_acceptance(run.answers["vanilla"])["mean acceptance length"] is None
    report.write_report(run_dir)
    assert "## Draft acceptance (vLLM's metrics)" in (run_dir / "summary.md").read_text()
