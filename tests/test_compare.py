"""Tests of `python -m bench compare` (bench/compare.py): synthetic summaries for each rule, and real
runs on a tiny random model for a planted regression and an identical rerun."""
import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import methods.pld
from bench import runner
from bench.__main__ import main
from bench.compare import compare_command, parse_tolerances
from bench.errors import UserError
from bench.metrics import SUMMARY_COLUMNS
from bench.report import write_report
from bench.runner import RunSettings

MODEL = "tiny-gemma3-random"  # its greedy output repeats itself, so PLD's drafts are accepted
HARDWARE = {"name": "Test CPU", "cpu_count": 2}


def write_side(folder: Path, rows: list[dict], hardware=HARDWARE, **config_changes) -> Path:
    """A run directory holding summary.csv with `rows` (missing columns filled) and a config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    defaults = {"model": "m", "runs": 1, "questions": 8, "new_tokens_mean": 100.0, "tokens_per_s": 10.0,
                "speedup": 1.0, "speedup_std": math.nan, "mean_accepted_tokens": 1.0, "acceptance_rate": math.nan,
                "lossless": 1.0, "near_ties": 0, "diverged": 0, "trained_params": 0, "extra_memory_bytes": 0,
                "peak_memory_bytes": 0}
    table = pd.DataFrame([{**defaults, **row} for row in rows], columns=SUMMARY_COLUMNS)
    table.to_csv(folder / "summary.csv", index=False)
    config = {"model": "m", "family": "llama", "template": "question_answer", "device": "cpu", "dtype": "float32",
              "matmul": "torch", "categories": ["qa"], "limit": 8, "max_new_tokens": 64, "runs": 1,
              "questions": {"sha256": "abc"},
              "methods": {"vanilla": {"options": {}}, "pld": {"options": {"max_ngram": 3, "num_draft": 10}}},
              "environment": {"hardware": hardware}}
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BASE_ROWS = [
    {"method": "vanilla", "category": "qa"},
    {"method": "vanilla", "category": "overall"},
    {"method": "pld", "category": "qa", "speedup": 1.5, "mean_accepted_tokens": 2.0},
    {"method": "pld", "category": "overall", "speedup": 1.4, "mean_accepted_tokens": 1.9},
]


def changed(**changes) -> list[dict]:
    """BASE_ROWS with the pld/qa row changed."""
    return [{**row, **changes} if (row["method"], row["category"]) == ("pld", "qa") else row for row in BASE_ROWS]


def run_compare(tmp_path, new_rows, *args, **config_changes) -> tuple[int, str]:
    base = write_side(tmp_path / "base", BASE_ROWS)
    new = write_side(tmp_path / "new", new_rows, **config_changes)
    out = io.StringIO()
    code = compare_command(str(base), str(new), *args, out=out)
    return code, out.getvalue()


def test_identical_summaries_pass(tmp_path):
    code, text = run_compare(tmp_path, BASE_ROWS)
    assert code == 0
    assert "0 regression(s)" in text and "4 rows compared" in text


@pytest.mark.parametrize("changes, metric", [
    ({"mean_accepted_tokens": 1.9}, "τ"),
    ({"lossless": 0.875, "near_ties": 1}, "lossless"),
    ({"diverged": 1}, "diverged"),
    ({"speedup": 1.2}, "speedup"),
])
def test_each_rule_flags_a_regression(tmp_path, changes, metric):
    code, text = run_compare(tmp_path, changed(**changes))
    assert code == 1, text
    line = next(line for line in text.splitlines() if line.startswith("pld"))
    assert metric in line and "REGRESSION" in line


def test_small_moves_and_improvements_pass(tmp_path):
    code, text = run_compare(tmp_path, changed(mean_accepted_tokens=1.995, speedup=1.45))  # within 1% / 20%
    assert code == 0 and "nothing moved" in text
    code, text = run_compare(tmp_path, changed(mean_accepted_tokens=2.5, speedup=2.0))
    assert code == 0 and "improved" in text


def test_speedup_only_warned_across_hardware_unless_strict(tmp_path):
    rows = changed(speedup=1.0)
    base = write_side(tmp_path / "base", BASE_ROWS)
    new = write_side(tmp_path / "new", rows, hardware={"name": "Other CPU", "cpu_count": 8})
    out = io.StringIO()
    assert compare_command(str(base), str(new), out=out) == 0
    assert "warning" in out.getvalue() and "--strict" in out.getvalue()
    assert compare_command(str(base), str(new), strict=True, out=io.StringIO()) == 1
    # τ is enforced whatever the hardware
    new = write_side(tmp_path / "new2", changed(mean_accepted_tokens=1.5), hardware={"name": "Other CPU"})
    assert compare_command(str(base), str(new), out=io.StringIO()) == 1


def test_speedup_of_small_rows_only_warned_with_min_questions(tmp_path):
    """--speedup-min-questions 6: a one-question category row that halves is a warning, an overall
    row of 6 questions that halves is still a regression, and τ is enforced on every row."""
    rows = [{**row, "questions": 1 if row["category"] == "qa" else 6} for row in BASE_ROWS]
    base = write_side(tmp_path / "base", rows)

    def run(new_rows) -> tuple[int, str]:
        out = io.StringIO()
        code = compare_command(str(base), str(write_side(tmp_path / "new", new_rows)), out=out,
                               speedup_min_questions=6)
        return code, out.getvalue()

    def with_pld(category, **changes):
        return [{**row, **changes} if (row["method"], row["category"]) == ("pld", category) else row for row in rows]

    code, text = run(with_pld("qa", speedup=0.7))
    assert code == 0 and "warning" in text and "at least 6 questions" in text
    assert compare_command(str(base), str(tmp_path / "new"), out=io.StringIO()) == 1  # every row by default
    code, text = run(with_pld("overall", speedup=0.7))
    assert code == 1 and "REGRESSION" in text
    code, text = run(with_pld("qa", mean_accepted_tokens=1.5))
    assert code == 1


def test_order_is_part_of_the_config(tmp_path):
    code, text = run_compare(tmp_path, BASE_ROWS, order="question")
    assert code == 2 and "order: 'method' vs 'question'" in text
    code, _ = run_compare(tmp_path, BASE_ROWS, order="method")  # the default, written out
    assert code == 0


def test_tolerance_option(tmp_path):
    code, _ = run_compare(tmp_path, changed(speedup=1.2), "speedup=0.25")
    assert code == 0
    code, _ = run_compare(tmp_path, changed(mean_accepted_tokens=1.9), "tau=0.1")
    assert code == 0
    with pytest.raises(UserError, match="tau, speedup"):
        parse_tolerances("latency=0.1")
    with pytest.raises(UserError, match="relative tolerance"):
        parse_tolerances("speedup=5")


def test_missing_row_and_schema_are_regressions(tmp_path):
    code, text = run_compare(tmp_path, [r for r in BASE_ROWS if r["category"] != "qa"])
    assert code == 1 and "missing" in text
    base = write_side(tmp_path / "b", BASE_ROWS)
    new = write_side(tmp_path / "n", BASE_ROWS)
    table = pd.read_csv(new / "summary.csv").drop(columns=["near_ties"])
    table.to_csv(new / "summary.csv", index=False)
    out = io.StringIO()
    assert compare_command(str(base), str(new), out=out) == 1
    assert "summary header" in out.getvalue()


def test_unusable_input_exits_2(tmp_path, capsys):
    base = write_side(tmp_path / "base", BASE_ROWS)
    assert compare_command(str(base), str(tmp_path / "nowhere"), out=io.StringIO()) == 2
    (tmp_path / "garbage.csv").write_text("\x00\x01 not,a\ncsv")
    assert compare_command(str(base), str(tmp_path / "garbage.csv"), out=io.StringIO()) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compare_command(str(base), str(empty), out=io.StringIO()) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_different_configs_are_reported_not_compared(tmp_path):
    code, text = run_compare(tmp_path, changed(speedup=0.5), max_new_tokens=128)
    assert code == 2
    assert "max_new_tokens: 64 vs 128" in text and "nothing compared" in text
    code, text = run_compare(tmp_path, changed(speedup=0.5), "", False, True, max_new_tokens=128)
    assert code == 1  # --ignore-config: compared, and the drop is found
    changed_options = {"vanilla": {"options": {}}, "pld": {"options": {"max_ngram": 1, "num_draft": 10}}}
    code, text = run_compare(tmp_path, BASE_ROWS, methods=changed_options)
    assert code == 2 and "methods[pld].options" in text


def test_an_option_added_at_its_default_keeps_old_baselines_comparable(tmp_path):
    """A baseline made before a method gained an option is compared with a run that records the new
    option at its declared default; the option at another value, or an unknown option, still differs."""
    default = methods.pld.PromptLookup.options["max_ngram"].default
    base = write_side(tmp_path / "base", BASE_ROWS, methods={"pld": {"name": "pld", "options": {"num_draft": 10}}})
    for value, comparable in ((default, True), (None, True), (default + 1, False)):
        new = write_side(tmp_path / f"new-{value}", BASE_ROWS,
                         methods={"pld": {"name": "pld", "options": {"num_draft": 10, "max_ngram": value}}})
        text = io.StringIO()
        assert (compare_command(str(base), str(new), out=text) == 0) == comparable, text.getvalue()
    unknown = write_side(tmp_path / "unknown", BASE_ROWS,
                         methods={"pld": {"name": "pld", "options": {"num_draft": 10, "window": 4}}})
    assert compare_command(str(base), str(unknown), out=io.StringIO()) == 2


def test_summary_csv_paths_work(tmp_path):
    base = write_side(tmp_path / "base", BASE_ROWS)
    new = write_side(tmp_path / "new", changed(mean_accepted_tokens=1.0))
    assert compare_command(str(base / "summary.csv"), str(new / "summary.csv"), out=io.StringIO()) == 1


# ---- real runs on a tiny model ---------------------------------------------------------------
@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def tiny_run(out: Path, questions_file: Path) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = runner.run(RunSettings(model=MODEL, methods="vanilla,pld", categories="summarization,rag", limit=1,
                                     max_new_tokens=64, questions=str(questions_file), out=str(out), matmul="torch"))
        write_report(out)
        return out
    finally:
        torch.set_num_threads(threads)


def _tokens(path: Path) -> list:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [(line["question_id"], [(c["output_ids"], c["accept_lengths"], c["turns"]) for c in line["choices"]])
            for line in lines]


def test_planted_regression_exits_1_and_identical_rerun_exits_0(tmp_path, questions_file, monkeypatch, capsys):
    base = tiny_run(tmp_path / "base", questions_file)
    table = pd.read_csv(base / "summary.csv")
    pld_tau = table[(table.method == "pld") & (table.category == "overall")].mean_accepted_tokens.item()
    assert pld_tau > 1.1, "the tiny model's PLD drafts must be accepted for this test to mean anything"

    rerun = tiny_run(tmp_path / "rerun", questions_file)
    # reproducible: the same config on the same machine gives the same tokens and accept lengths
    for label in ("vanilla", "pld"):
        first, second = (_tokens(folder / "answers" / f"{label}.jsonl") for folder in (base, rerun))
        assert first == second and first
    # Same machine, so speedup is enforced; tiny-model timings are a few milliseconds of Python
    # overhead each, so the rerun is compared with a wide speedup tolerance (τ stays exact).
    assert main(["compare", str(base), str(rerun), "--tolerance", "tau=0.0,speedup=0.9"]) == 0

    # a code change that breaks the lookup (no match found any more): same config, lower τ
    monkeypatch.setattr(methods.pld.PromptLookup, "draft", lambda self, tokens: [])
    worse = tiny_run(tmp_path / "worse", questions_file)
    capsys.readouterr()
    assert main(["compare", str(base), str(worse), "--tolerance", "speedup=0.9"]) == 1
    printed = capsys.readouterr().out
    assert any(line.startswith("pld") and "τ" in line and "REGRESSION" in line for line in printed.splitlines())


def test_a_machine_where_auto_resolves_otherwise_is_compared_with_a_warning(tmp_path, questions_file, capsys):
    """The resolved product path is the machine's, like its CPU: another one warns, never exits 2."""
    import shutil
    base = tiny_run(tmp_path / "base", questions_file)
    other = tmp_path / "other"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    assert config["matmul"] == "torch" and config["environment"]["matmul_resolved"] == "torch"
    config["matmul"] = "auto"
    config["environment"]["matmul_resolved"] = "kernel"
    (other / "config.json").write_text(json.dumps(config))
    base_config = json.loads((base / "config.json").read_text())
    base_config["matmul"] = "auto"
    (base / "config.json").write_text(json.dumps(base_config))
    capsys.readouterr()
    assert main(["compare", str(base), str(other)]) == 0
    printed = capsys.readouterr().out
    assert "speedup only warned about" in printed and "kernel products" in printed
