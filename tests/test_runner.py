"""Tests of the sweep (bench/runner.py), method specs (bench/specs.py) and the CLI (bench/__main__.py).

Every run uses the tiny random models (byte tokenizer, ~1 s to load) on the CPU, a few new tokens and
`--limit 1`, so the whole file runs in seconds. Nothing touches the real cache: XDG_CACHE_HOME points
into tmp_path. The CLI is called in-process through `bench.__main__.main`.
"""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import methods
from bench import data, metrics, report, runner
from bench.__main__ import main
from bench.models import build_prompt
from bench.tiny import ByteTokenizer
from bench.errors import UserError
from bench.runner import RunSettings
from bench.specs import MethodSpec, label_file_name, parse_method_specs
from methods import Option
from methods.vanilla import Vanilla

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ROOT / "shared/spec_bench/question.jsonl"
CHECK_RUN = ROOT / "shared/tools/check_run.py"
MODEL = "tiny-llama-random"
HEADER = ("model,method,category,runs,questions,new_tokens_mean,tokens_per_s,speedup,speedup_std,"
          "mean_accepted_tokens,acceptance_rate,lossless,near_ties,diverged,trained_params,"
          "extra_memory_bytes,peak_memory_bytes")


# ---- helpers and fixtures ----------------------------------------------------------------------
@pytest.fixture
def questions():
    if not QUESTIONS.is_file():
        pytest.skip(f"Spec-Bench question file not found at {QUESTIONS} (the shared workspace copy)")
    return str(QUESTIONS)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SPEC_BENCH_QUESTIONS", raising=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def register():
    """Register test methods under unique names; unregistered when the test ends."""
    names = []

    def add(name, cls):
        methods.register(name)(cls)
        names.append(name)
        return cls

    yield add
    for name in names:
        methods._REGISTRY.pop(name, None)


def run_args(questions, out, methods_spec="vanilla,hf-generate", *extra, categories="mt_bench,qa",
             max_new_tokens=8, report=True, matmul="torch"):
    # --matmul torch: `auto` is a timing measurement whose outcome may change between runs (see
    # test_resume_with_matmul_auto), which would make resume tests flaky.
    args = ["run", "--model", MODEL, "--methods", methods_spec, "--limit", "1", "--categories", categories,
            "--max-new-tokens", str(max_new_tokens), "--questions", questions, "--out", str(out),
            "--device", "cpu", "--matmul", matmul, *extra]
    return args if report else args + ["--no-report"]


def run_ok(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured


def run_error(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "error: " in err
    return err


def answer_lines(out, label="vanilla") -> list[str]:
    return [line for line in (Path(out) / "answers" / f"{label}.jsonl").read_text().splitlines() if line.strip()]


def answers(out, label="vanilla") -> dict[int, dict]:
    return {r["question_id"]: r for r in map(json.loads, answer_lines(out, label))}


def write_summary(out) -> None:
    """summary.csv as `bench report` writes it, without the (slow) figures."""
    report.write_csv(metrics.summarize(metrics.load_run(out)), Path(out) / "summary.csv")


def summary_rows(out) -> list[dict]:
    with open(Path(out) / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def summary_row(out, method, category="overall") -> dict:
    rows = [r for r in summary_rows(out) if r["method"] == method and r["category"] == category]
    assert len(rows) == 1, (method, category, summary_rows(out))
    return rows[0]


def selected(questions, categories, limit=1) -> list[dict]:
    groups = data.resolve_categories(categories)
    return data.select_questions(data.load_questions(questions), groups, limit)


def first_prompt(question) -> list[int]:
    """Turn 1's prompt ids for the tiny models (byte tokenizer, question_answer template)."""
    return ByteTokenizer().encode(build_prompt("question_answer", question["turns"][:1], []))


# ---- 1. end to end -----------------------------------------------------------------------------
def test_end_to_end_run_directory(questions, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(run_args(questions, out, matmul="auto"), capsys)

    check = subprocess.run([sys.executable, str(CHECK_RUN), str(out), "--lossless", "hf-generate"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    expected = selected(questions, "mt_bench,qa")
    assert [q["group"] for q in expected] == ["mt_bench", "qa"]
    for label in ("vanilla", "hf-generate"):
        records = [json.loads(line) for line in answer_lines(out, label)]
        ids = [r["question_id"] for r in records]
        assert ids == sorted(ids) == sorted(q["question_id"] for q in expected)
        for record in records:
            assert record["model_id"] == label and "error" not in record
            assert len(record["choices"]) == 1
            choice = record["choices"][0]
            assert choice["index"] == 0
            assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"]) > 0
            assert [len(ids) for ids in choice["output_ids"]] == choice["new_tokens"]
            assert all(0 < n <= 8 for n in choice["new_tokens"])
            n_turns = 2 if record["group"] == "mt_bench" else 1
            for key in ("turns", "decoding_steps", "new_tokens", "wall_time"):
                assert len(choice[key]) == n_turns, key
            assert all(w > 0 for w in choice["wall_time"])
            if label == "vanilla":
                assert set(choice["accept_lengths"]) == {1}
                assert choice["decoding_steps"] == choice["new_tokens"]
            assert choice["lossless"] == "identical"

    with open(out / "summary.csv") as handle:
        assert handle.readline().rstrip("\r\n") == HEADER
    rows = summary_rows(out)
    assert {(r["method"], r["category"]) for r in rows} == {
        (m, c) for m in ("vanilla", "hf-generate") for c in ("mt_bench", "qa", "overall")}
    assert float(summary_row(out, "vanilla")["speedup"]) == pytest.approx(1.0)
    assert float(summary_row(out, "vanilla")["mean_accepted_tokens"]) == 1.0
    assert int(summary_row(out, "hf-generate")["questions"]) == 2

    config = json.loads((out / "config.json").read_text())
    assert config["model"] == MODEL
    assert config["dtype"] == "float32"
    assert config["device"] == "cpu"
    assert config["matmul"] == "auto"  # as requested; the machine's resolved path is environment, out of the hash
    assert config["environment"]["matmul_resolved"] in ("torch", "blas", "kernel")
    assert config["questions"]["sha256"] == data.file_sha256(questions)
    assert config["categories"] == ["mt_bench", "qa"]
    assert config["limit"] == 1 and config["max_new_tokens"] == 8 and config["runs"] == 1
    assert list(config["methods"]) == ["vanilla", "hf-generate"]
    for label, entry in config["methods"].items():
        assert entry["name"] == label and entry["spec"] == label
        assert entry["options"] == {}  # neither method has options: fully resolved is empty
    assert len(config["config_hash"]) == 64
    assert config["config_hash"] == runner.config_hash(config)
    environment = config["environment"]
    assert environment["git_commit"] and isinstance(environment["git_commit"], str)
    assert "torch" in environment["packages"]
    assert environment["hardware"]["cpu_count"] >= 1 and environment["hardware"]["name"]


# ---- 2. vanilla always runs first --------------------------------------------------------------
def test_vanilla_added_and_first(questions, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(run_args(questions, out, "hf-generate", categories="qa", report=False), capsys)
    config = json.loads((out / "config.json").read_text())
    assert list(config["methods"]) == ["vanilla", "hf-generate"]
    assert sorted(p.name for p in (out / "answers").glob("*.jsonl")) == ["hf-generate.jsonl", "vanilla.jsonl"]
    stats = json.loads((out / "method_stats.json").read_text())
    assert list(stats) == ["vanilla", "hf-generate"]


def test_vanilla_listed_last_still_runs_first(questions, tmp_path):
    out = runner.run(RunSettings(model=MODEL, methods="hf-generate,vanilla", categories="qa", limit=1,
                                 max_new_tokens=4, questions=questions, out=str(tmp_path / "run"),
                                 device="cpu", matmul="torch"))
    config = json.loads((out / "config.json").read_text())
    assert list(config["methods"]) == ["vanilla", "hf-generate"]
    # hf-generate was compared with vanilla, which only works when vanilla ran before it
    assert all(r["choices"][0]["lossless"] == "identical" for r in answers(out, "hf-generate").values())


# ---- 3. --runs ---------------------------------------------------------------------------------
def test_runs_two(questions, tmp_path, capsys, register):
    class Same(Vanilla):
        """Vanilla's tokens under another label."""

    register("test-same-runs", Same)
    out = tmp_path / "run"
    run_ok(run_args(questions, out, "test-same-runs", "--runs", "2", categories="writing,qa", max_new_tokens=6,
                    report=False), capsys)
    write_summary(out)
    for label in ("vanilla", "test-same-runs"):
        for record in answers(out, label).values():
            assert [c["index"] for c in record["choices"]] == [0, 1]
            assert record["choices"][0]["output_ids"] == record["choices"][1]["output_ids"]
            assert all(c["lossless"] == "identical" for c in record["choices"])
    assert json.loads((out / "config.json").read_text())["runs"] == 2
    for method in ("vanilla", "test-same-runs"):
        row = summary_row(out, method)
        assert row["runs"] == "2"
        std = float(row["speedup_std"])
        assert math.isfinite(std) and std >= 0
    assert float(summary_row(out, "vanilla")["speedup_std"]) == pytest.approx(0.0)


# ---- 4. resume ---------------------------------------------------------------------------------
def test_resume_skips_finished_and_redoes_missing(questions, tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(questions, out, "vanilla", categories="mt_bench,qa,translation", max_new_tokens=4,
                    report=False)
    run_ok(args, capsys)
    first = answer_lines(out)
    assert len(first) == 3
    stamps = {qid: r["tstamp"] for qid, r in answers(out).items()}

    run_ok(args, capsys)  # same command: nothing to do
    assert answer_lines(out) == first

    dropped = json.loads(first[1])["question_id"]
    kept = [line for i, line in enumerate(first) if i != 1]
    (out / "answers" / "vanilla.jsonl").write_text("\n".join(kept) + "\n")
    run_ok(args, capsys)
    again = answer_lines(out)
    assert len(again) == 3
    assert [json.loads(line)["question_id"] for line in again] == [json.loads(line)["question_id"] for line in first]
    assert [line for line in again if json.loads(line)["question_id"] != dropped] == kept  # untouched
    redone = answers(out)[dropped]
    assert redone["tstamp"] > stamps[dropped]
    assert redone["choices"][0]["output_ids"] == json.loads(first[1])["choices"][0]["output_ids"]


def test_resume_reruns_failed_question(questions, tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(questions, out, "vanilla", categories="writing,qa", report=False)
    run_ok(args, capsys)
    lines = answer_lines(out)
    failed = json.loads(lines[1])
    failed.update(choices=[], error="RuntimeError: earlier failure")
    (out / "answers" / "vanilla.jsonl").write_text("\n".join([lines[0], json.dumps(failed)]) + "\n")
    run_ok(args, capsys)
    now = answer_lines(out)
    assert now[0] == lines[0]
    record = json.loads(now[1])
    assert "error" not in record and len(record["choices"]) == 1


def test_resume_with_matmul_auto(questions, tmp_path, capsys, monkeypatch):
    real = runner.pick_matmul_path
    outcomes = iter(["torch", "blas"])  # what the auto measurement picks in the first and second run

    def measured(model, requested="auto"):
        return real(model, next(outcomes) if requested == "auto" else requested)

    monkeypatch.setattr(runner, "pick_matmul_path", measured)
    args = run_args(questions, tmp_path / "run", "vanilla", categories="qa", report=False, matmul="auto")
    run_ok(args, capsys)
    lines = answer_lines(tmp_path / "run")
    run_ok(args, capsys)  # the same command again: it should resume
    assert answer_lines(tmp_path / "run") == lines


# ---- 5. config mismatch, extending a run -------------------------------------------------------
def test_different_config_in_same_out_is_refused(questions, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(run_args(questions, out, "vanilla", categories="qa", report=False), capsys)
    before = {p.name: p.read_bytes() for p in (out / "answers").iterdir()}
    err = run_error(run_args(questions, out, "vanilla", categories="qa", max_new_tokens=6, report=False), capsys)
    assert "max_new_tokens" in err
    assert "--out" in err and "delete" in err
    assert {p.name: p.read_bytes() for p in (out / "answers").iterdir()} == before


def test_different_categories_in_same_out_is_refused(questions, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(run_args(questions, out, "vanilla", categories="qa", report=False), capsys)
    err = run_error(run_args(questions, out, "vanilla", categories="translation", report=False), capsys)
    assert "categories" in err


def test_adding_a_method_keeps_vanilla_answers(questions, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(run_args(questions, out, "vanilla", categories="writing,qa", report=False), capsys)
    vanilla = answer_lines(out)
    run_ok(run_args(questions, out, "vanilla,hf-generate", categories="writing,qa", report=False), capsys)
    write_summary(out)
    assert answer_lines(out) == vanilla
    assert len(answer_lines(out, "hf-generate")) == 2
    config = json.loads((out / "config.json").read_text())
    assert list(config["methods"]) == ["vanilla", "hf-generate"]
    assert config["config_hash"] == runner.config_hash(config)
    assert {r["method"] for r in summary_rows(out)} == {"vanilla", "hf-generate"}
    # and a later run naming fewer methods still resumes (the stored methods are kept)
    run_ok(run_args(questions, out, "vanilla", categories="writing,qa", report=False), capsys)
    assert list(json.loads((out / "config.json").read_text())["methods"]) == ["vanilla", "hf-generate"]


# ---- 6. corrupt answer file --------------------------------------------------------------------
def test_corrupt_answer_line_is_reported(questions, tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(questions, out, "vanilla", categories="writing,qa", report=False)
    run_ok(args, capsys)
    path = out / "answers" / "vanilla.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = "{this is not json"
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    err = run_error(args, capsys)
    assert "vanilla.jsonl" in err and "line 2" in err
    assert path.read_bytes() == before


# ---- 7. bad input ------------------------------------------------------------------------------
def test_unknown_model(questions, tmp_path, capsys):
    err = run_error(["run", "--model", "no-such-model", "--methods", "vanilla", "--limit", "1", "--categories",
                     "qa", "--questions", questions, "--out", str(tmp_path / "r"), "--device", "cpu"], capsys)
    assert "no-such-model" in err and "gemma-3-270m" in err and MODEL in err
    assert not (tmp_path / "r").exists()


def test_unknown_method(questions, tmp_path, capsys):
    err = run_error(run_args(questions, tmp_path / "r", "vanilla,nosuch"), capsys)
    assert "nosuch" in err and "vanilla" in err and "hf-generate" in err


def test_unknown_category(questions, tmp_path, capsys):
    err = run_error(run_args(questions, tmp_path / "r", categories="qa,nosuch"), capsys)
    assert "nosuch" in err and "mt_bench" in err


@pytest.mark.parametrize("flag,value", [("--limit", "0"), ("--limit", "-1"), ("--max-new-tokens", "0"),
                                        ("--runs", "0")])
def test_non_positive_numbers(questions, tmp_path, capsys, flag, value):
    args = run_args(questions, tmp_path / "r")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    err = run_error(args, capsys)
    assert flag in err and "positive" in err
    assert not (tmp_path / "r").exists()


def test_unknown_method_option(questions, tmp_path, capsys, register):
    err = run_error(run_args(questions, tmp_path / "r", "vanilla,hf-generate+foo=1"), capsys)
    assert "foo" in err and "hf-generate" in err and "valid: none" in err

    class Knob(Vanilla):
        options = {"depth": Option(int, 2, "a test knob"), "width": Option(int, 3, "another")}

    register("test-knob", Knob)
    err = run_error(run_args(questions, tmp_path / "r", "test-knob+foo=1"), capsys)
    assert "foo" in err and "depth" in err and "width" in err


def test_bad_option_value(questions, tmp_path, capsys, register):
    class Knob(Vanilla):
        options = {"depth": Option(int, 2, "a test knob")}

    register("test-knob2", Knob)
    err = run_error(run_args(questions, tmp_path / "r", "test-knob2+depth=deep"), capsys)
    assert "depth" in err and "deep" in err


def test_malformed_method_spec(questions, tmp_path, capsys):
    err = run_error(run_args(questions, tmp_path / "r", "vanilla,hf-generate+foo"), capsys)
    assert "NAME+key=value" in err
    err = run_error(run_args(questions, tmp_path / "r", "vanilla,vanilla"), capsys)
    assert "twice" in err
    err = run_error(run_args(questions, tmp_path / "r", " , "), capsys)
    assert "--methods" in err


def test_missing_question_file(tmp_path, capsys):
    err = run_error(run_args(str(tmp_path / "nope.jsonl"), tmp_path / "r"), capsys)
    assert "nope.jsonl" in err and "--questions" in err


def test_corrupt_question_file(questions, tmp_path, capsys):
    bad = tmp_path / "question.jsonl"
    lines = Path(questions).read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"question_id": 99999, "category": "qa", "turns": ["x"'] + lines[2:])
                   + "\n")
    err = run_error(run_args(str(bad), tmp_path / "r"), capsys)
    assert "question.jsonl" in err and "line 3" in err


@pytest.mark.parametrize("method_args,needle", [
    (["vanilla"], "NAME:key=value"),
    (["hf-generate:foo"], "key=value"),
    (["nosuch:a=1"], "nosuch"),
    (["hf-generate:foo=1"], "valid: none"),
])
def test_malformed_method_args(questions, tmp_path, capsys, method_args, needle):
    err = run_error(run_args(questions, tmp_path / "r") + ["--method-args", *method_args], capsys)
    assert needle in err


def test_bad_config_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    err = run_error(["run", "--config", str(tmp_path / "config.json")], capsys)
    assert "--config" in err
    (tmp_path / "config.json").write_text("{}")
    err = run_error(["run", "--config", str(tmp_path / "config.json")], capsys)
    assert "--config" in err and "lacks the field" in err


# ---- 8. per-question errors and the lossless classification ------------------------------------
def test_failed_question_is_recorded_and_lossless_classified(questions, tmp_path, register):
    qa_question = selected(questions, "qa")[0]
    fail_prompt = first_prompt(qa_question)

    class Flaky(Vanilla):
        def generate(self, prompt_ids, max_new_tokens, stop_ids):
            if list(prompt_ids) == fail_prompt:
                raise RuntimeError("boom on purpose")
            return super().generate(prompt_ids, max_new_tokens, stop_ids)

    class Same(Vanilla):
        """Vanilla's tokens through another label."""

    class Alter(Vanilla):
        def generate(self, prompt_ids, max_new_tokens, stop_ids):
            generation = super().generate(prompt_ids, max_new_tokens, stop_ids)
            ids = list(generation.new_ids)
            if len(ids) > 3:
                ids[3] = 5 if ids[3] != 5 else 6  # a different, non-stop id
            return methods.Generation(ids, generation.accept_lengths)

    register("test-flaky", Flaky)
    register("test-same", Same)
    register("test-alter", Alter)
    out = runner.run(RunSettings(model=MODEL, methods="test-flaky,test-same,test-alter", categories="writing,qa",
                                 limit=1, max_new_tokens=6, questions=questions, out=str(tmp_path / "run"),
                                 device="cpu", matmul="torch"))
    write_summary(out)
    qa_id = qa_question["question_id"]

    flaky = answers(out, "test-flaky")
    assert len(flaky) == 2
    assert flaky[qa_id]["choices"] == []
    assert "RuntimeError" in flaky[qa_id]["error"] and "boom on purpose" in flaky[qa_id]["error"]
    (other,) = [r for q, r in flaky.items() if q != qa_id]
    assert "error" not in other and other["choices"][0]["lossless"] == "identical"
    assert summary_row(out, "test-flaky")["questions"] == "1"
    assert summary_row(out, "test-flaky", "writing")["questions"] == "1"
    assert summary_row(out, "test-flaky", "qa")["questions"] == "0"
    assert summary_row(out, "vanilla")["questions"] == "2"

    assert all(r["choices"][0]["lossless"] == "identical" for r in answers(out, "test-same").values())
    assert float(summary_row(out, "test-same")["lossless"]) == 1.0

    vanilla = answers(out)
    altered = answers(out, "test-alter")
    changed = 0
    for qid, record in altered.items():
        choice = record["choices"][0]
        reference = vanilla[qid]["choices"][0]["output_ids"]
        assert len(reference[0]) > 3  # the test needs token 3 to exist in turn 1
        assert choice["output_ids"][0] != reference[0]
        assert choice["lossless"] in ("near_tie", "diverged")
        changed += 1
    row = summary_row(out, "test-alter")
    assert int(row["diverged"]) + int(row["near_ties"]) == changed == 2
    assert float(row["lossless"]) == 0.0


def test_failure_on_first_question_is_recorded(questions, tmp_path, register):
    first = selected(questions, "writing,qa")[0]
    fail_prompt = first_prompt(first)

    class FailsFirst(Vanilla):
        def generate(self, prompt_ids, max_new_tokens, stop_ids):
            if list(prompt_ids) == fail_prompt:
                raise RuntimeError("boom on the first question")
            return super().generate(prompt_ids, max_new_tokens, stop_ids)

    register("test-fails-first", FailsFirst)
    out = runner.run(RunSettings(model=MODEL, methods="vanilla,test-fails-first", categories="writing,qa", limit=1,
                                 max_new_tokens=4, questions=questions, out=str(tmp_path / "run"), device="cpu", matmul="torch"))
    records = answers(out, "test-fails-first")
    assert "boom" in records[first["question_id"]]["error"]
    assert sum("error" not in r for r in records.values()) == 1


# ---- 9. run --config ---------------------------------------------------------------------------
def test_rerun_from_config_reproduces_tokens(questions, tmp_path, capsys):
    out, again = tmp_path / "run", tmp_path / "again"
    run_ok(run_args(questions, out, "vanilla,hf-generate", categories="mt_bench,qa", report=False), capsys)
    run_ok(["run", "--config", str(out / "config.json"), "--out", str(again), "--questions", questions,
            "--no-report"], capsys)
    original = json.loads((out / "config.json").read_text())
    rerun = json.loads((again / "config.json").read_text())
    assert rerun["config_hash"] == original["config_hash"]
    for label in ("vanilla", "hf-generate"):
        first, second = answers(out, label), answers(again, label)
        assert sorted(first) == sorted(second)
        for qid in first:
            assert second[qid]["choices"][0]["output_ids"] == first[qid]["choices"][0]["output_ids"]


def test_rerun_from_config_cli_flags_override(questions, tmp_path, capsys):
    out, again = tmp_path / "run", tmp_path / "again"
    run_ok(run_args(questions, out, "vanilla", categories="qa", report=False), capsys)
    run_ok(["run", "--config", str(out / "config.json"), "--out", str(again), "--questions", questions,
            "--max-new-tokens", "3", "--no-report"], capsys)
    rerun = json.loads((again / "config.json").read_text())
    assert rerun["max_new_tokens"] == 3 and rerun["categories"] == ["qa"] and rerun["model"] == MODEL
    assert all(n <= 3 for r in answers(again).values() for n in r["choices"][0]["new_tokens"])


def test_rerun_from_config_uses_same_questions(questions, tmp_path, capsys, monkeypatch):
    own = tmp_path / "own_questions.jsonl"
    lines = Path(questions).read_text().splitlines()
    first = json.loads(lines[0])
    first["turns"] = ["Write one short sentence.", "Now shorter."]
    own.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    out, again = tmp_path / "run", tmp_path / "again"
    run_ok(run_args(str(own), out, "vanilla", categories="writing", report=False), capsys)
    monkeypatch.setenv("SPEC_BENCH_QUESTIONS", questions)  # a different file is the default now
    code = main(["run", "--config", str(out / "config.json"), "--out", str(again), "--no-report"])
    capsys.readouterr()
    if code == 0:  # either rerun the same questions, or refuse: never silently run others
        original = json.loads((out / "config.json").read_text())
        rerun = json.loads((again / "config.json").read_text())
        assert rerun["questions"]["sha256"] == original["questions"]["sha256"]
    else:
        assert code == 2


def test_rerun_from_config_keeps_variant_options(questions, tmp_path, capsys, register):
    class Knob(Vanilla):
        options = {"k": Option(int, 1, "a test knob")}

    register("test-variant", Knob)
    out, again = tmp_path / "run", tmp_path / "again"
    run_ok(run_args(questions, out, "test-variant,test-variant+k=3", categories="qa", max_new_tokens=2,
                    report=False), capsys)
    original = json.loads((out / "config.json").read_text())
    assert original["methods"]["test-variant"]["options"] == {"k": 1}
    assert original["methods"]["test-variant+k=3"]["options"] == {"k": 3}
    run_ok(["run", "--config", str(out / "config.json"), "--out", str(again), "--questions", questions,
            "--no-report"], capsys)
    rerun = json.loads((again / "config.json").read_text())
    assert {k: v["options"] for k, v in rerun["methods"].items()} == \
        {k: v["options"] for k, v in original["methods"].items()}


# ---- 10. list and help -------------------------------------------------------------------------
def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for needle in ("methods", "vanilla", "hf-generate", "models", "gemma-3-270m", MODEL, "vicuna-7b",
                   "groups", "mt_bench", "writing", "math_reasoning", "rag"):
        assert needle in out, needle


def test_run_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--method-args" in out and "--config" in out and "--runs" in out


# ---- 11. specs and labels ----------------------------------------------------------------------
def test_spec_labels(register):
    assert [s.label for s in parse_method_specs("vanilla,hf-generate")] == ["vanilla", "hf-generate"]
    assert [s.file_name for s in parse_method_specs(" vanilla , hf-generate ,")] == ["vanilla", "hf-generate"]

    class Knob(Vanilla):
        options = {"alpha": Option(int, 1, "a"), "beta": Option(str, "x", "b")}

    register("test-labels", Knob)
    (spec,) = parse_method_specs("test-labels+beta=y/z+alpha=2")
    assert spec.options == {"beta": "y/z", "alpha": "2"}
    assert spec.label == "test-labels+alpha=2+beta=y/z"
    assert spec.file_name == "test-labels+alpha=2+beta=y%2Fz"
    assert MethodSpec("m", {"z": "1", "a": "2"}).label == "m+a=2+z=1"


def test_label_file_name():
    assert label_file_name("a/b c") == "a%2Fb%20c"
    assert label_file_name("Ab9+key=1.5_x-y") == "Ab9+key=1.5_x-y"
    assert label_file_name("a:b") == "a%3Ab"


# ---- 10. GPU fidelity: twins, the lossless check's place, long prompts --------------------------
def test_a_variant_that_resolves_to_another_is_skipped_not_timed_twice(questions, tmp_path):
    """kangaroo+draft_vocab=32768 on a 260-token vocabulary is plain kangaroo."""
    with pytest.warns(UserWarning, match="seeded random"):
        out = runner.run(RunSettings(model=MODEL, methods="vanilla,kangaroo,kangaroo+draft_vocab=32768",
                                     categories="qa", limit=1, max_new_tokens=4, questions=questions,
                                     out=str(tmp_path / "run"), device="cpu", matmul="torch"))
    stats = json.loads((out / "method_stats.json").read_text())
    assert stats["kangaroo"]["status"] == "ok"
    twin = stats["kangaroo+draft_vocab=32768"]
    assert twin["status"] == "skipped" and "the same method as kangaroo" in twin["reason"]
    assert not (out / "answers" / "kangaroo+draft_vocab=32768.jsonl").exists()
    write_summary(out)
    assert summary_row(out, "kangaroo+draft_vocab=32768")["questions"] == "0"


def test_lossless_check_runs_after_the_timed_window(questions, tmp_path, register, monkeypatch):
    events = []

    class Recorded(Vanilla):
        def generate(self, prompt_ids, max_new_tokens, stop_ids):
            events.append("generate")
            return super().generate(prompt_ids, max_new_tokens, stop_ids)

    def classify(*args):
        events.append("classify")
        return "identical"

    register("test-recorded", Recorded)
    monkeypatch.setattr(runner, "classify", classify)
    runner.run(RunSettings(model=MODEL, methods="vanilla,test-recorded", categories="writing,qa", limit=1,
                           max_new_tokens=4, questions=questions, out=str(tmp_path / "run"), device="cpu",
                           matmul="torch"))
    assert events == ["generate"] * 4 + ["classify"] * 2  # warm-up, 2 + 1 turns, then both checks


def test_question_order_runs_every_method_per_question_with_the_same_answers(questions, tmp_path, monkeypatch):
    """--order question: each question's methods run back to back (vanilla first), answers and
    lossless labels equal a method-order run's, and a rerun resumes without generating again."""
    events = []
    answer = runner.answer_question

    def recorded(model, method, question, *args, **kwargs):
        events.append((type(method).__name__, question["question_id"]))
        return answer(model, method, question, *args, **kwargs)

    monkeypatch.setattr(runner, "answer_question", recorded)
    common = dict(model=MODEL, methods="vanilla,pld,kangaroo", categories="writing,qa", limit=1, max_new_tokens=6,
                  questions=questions, device="cpu", matmul="torch")
    with pytest.warns(UserWarning, match="seeded random"):
        paired = runner.run(RunSettings(**common, out=str(tmp_path / "paired"), order="question"))
    ids = [q["question_id"] for q in selected(questions, "writing,qa")]
    assert events == [(name, qid) for qid in ids for name in ("Vanilla", "PromptLookup", "Kangaroo")]
    events.clear()
    with pytest.warns(UserWarning, match="seeded random"):
        serial = runner.run(RunSettings(**common, out=str(tmp_path / "serial")))
    assert events == [(name, qid) for name in ("Vanilla", "PromptLookup", "Kangaroo") for qid in ids]
    for label in ("vanilla", "pld", "kangaroo"):
        left = runner.read_answers(paired / "answers" / f"{label}.jsonl")
        right = runner.read_answers(serial / "answers" / f"{label}.jsonl")
        assert [[c["output_ids"] for c in left[q]["choices"]] for q in ids] == \
            [[c["output_ids"] for c in right[q]["choices"]] for q in ids]
        assert [left[q]["choices"][0]["lossless"] for q in ids] == ["identical"] * len(ids)
    stats = json.loads((paired / "method_stats.json").read_text())
    assert all(stats[label]["status"] == "ok" and stats[label]["peak_memory_bytes"] > 0
               for label in ("vanilla", "pld", "kangaroo"))
    assert json.loads((paired / "config.json").read_text())["order"] == "question"
    assert "order" not in json.loads((serial / "config.json").read_text())  # the default is left out
    events.clear()
    with pytest.warns(UserWarning, match="seeded random"):
        runner.run(RunSettings(**common, out=str(tmp_path / "paired"), order="question"))
    assert events == []
    with pytest.raises(UserError, match="--order"):
        runner.run(RunSettings(**common, out=str(tmp_path / "bad"), order="random"))


def test_a_turn_past_the_models_positions_is_warned_about_once(questions, capsys, monkeypatch):
    from tests.conftest import tiny
    model = tiny(MODEL)
    question = selected(questions, "qa")[0]
    monkeypatch.setattr(model.runtime.config, "max_positions", len(first_prompt(question)) + 2)
    vanilla = methods.get("vanilla")(model.runtime)
    runner.answer_question(model, vanilla, question, 4, 0)
    runner.answer_question(model, vanilla, question, 4, 1)
    err = capsys.readouterr().err
    assert err.count("warning: question") == 1 and "exceed" in err and f"{len(first_prompt(question)) + 2} positions" in err
    runner.answer_question(model, vanilla, question, 2, 0)  # fits: no warning


# ---- 11. sampling (temperature > 0) ------------------------------------------------------------
def test_greedy_runs_keep_their_config_without_a_temperature(questions, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(run_args(questions, out, "vanilla", categories="qa", report=False), capsys)
    config = json.loads((out / "config.json").read_text())
    assert "temperature" not in config and "seed" not in config  # the committed baselines' hashes hold
    run_ok(run_args(questions, out, "vanilla", "--temperature", "0", categories="qa", report=False), capsys)


def test_a_sampled_run_names_rules_leaves_lossless_empty_and_reproduces(questions, tmp_path, capsys):
    spec = "vanilla,pld,medusa+accept=typical"
    args = lambda out, *extra: run_args(questions, out, spec, "--temperature", "1.0", "--seed", "3", "--runs", "2",  # noqa: E731
                                        *extra, categories="writing,qa", max_new_tokens=8)
    run_ok(args(tmp_path / "a"), capsys)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["temperature"] == 1.0 and config["seed"] == 3
    stats = json.loads((tmp_path / "a" / "method_stats.json").read_text())
    assert [stats[label]["rule"] for label in spec.split(",")] == ["exact", "exact", "typical"]
    for label in spec.split(","):
        row = summary_row(tmp_path / "a", label)
        assert row["lossless"] == row["near_ties"] == row["diverged"] == ""
        assert all("lossless" not in choice for record in answers(tmp_path / "a", label).values()
                   for choice in record["choices"])
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "Acceptance rules (sampling at temperature 1)" in summary and "| medusa+accept=typical | typical |" in summary
    # the same settings draw the same samples; the two runs are independent samples
    run_ok(args(tmp_path / "b", "--no-report"), capsys)
    first, again = answers(tmp_path / "a"), answers(tmp_path / "b")
    assert all(first[q]["choices"][r]["output_ids"] == again[q]["choices"][r]["output_ids"] for q in first for r in (0, 1))
    assert any(first[q]["choices"][0]["output_ids"] != first[q]["choices"][1]["output_ids"] for q in first)
    # another seed, other samples; another temperature is another config
    run_ok(run_args(questions, tmp_path / "c", spec, "--temperature", "1.0", "--seed", "4", "--runs", "2",
                    categories="writing,qa", max_new_tokens=8, report=False), capsys)
    other = answers(tmp_path / "c")
    assert any(first[q]["choices"][0]["output_ids"] != other[q]["choices"][0]["output_ids"] for q in first)
    err = run_error(run_args(questions, tmp_path / "a", spec, "--temperature", "0.5", "--seed", "3", "--runs", "2",
                             categories="writing,qa", max_new_tokens=8), capsys)
    assert "different config" in err and "temperature" in err


def test_a_negative_temperature_is_refused(questions, tmp_path, capsys):
    err = run_error(run_args(questions, tmp_path / "run", "vanilla", "--temperature", "-1"), capsys)
    assert "--temperature must be 0" in err
