"""Tests of the Ray launcher (bench/launch.py), and `--device-map auto` on one device (the split
over several is in test_device_map.py).

The Ray tests start a local Ray cluster of 2 CPUs once for the module and run the tiny random Llama
in float64 on it (a few questions, 8 new tokens), so that a Ray run and a sequential run of the
same settings must produce the same tokens. Failures are injected with the launcher's test hook
$SPEC_BENCH_FAIL_CELL (bench.launch.inject_failure). The tests without a cluster (no Ray
installed, --device-map, cell planning) run without Ray.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import metrics
from bench.__main__ import main
from bench.launch import FAIL_ENV, cell_directory, plan_cells

ROOT = Path(__file__).resolve().parents[2]
CHECK_RUN = ROOT / "shared/tools/check_run.py"
MODEL = "tiny-llama-random"


@pytest.fixture
def questions(questions_file):
    """The shared question file (conftest's fixture skips when it is missing), as a path string."""
    return str(questions_file)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SPEC_BENCH_QUESTIONS", raising=False)
    monkeypatch.delenv(FAIL_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread in this process, as each 1-CPU cell has: the same products, the same floats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for this module; the launcher finds it connected and uses it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def run_args(questions, out, *extra, methods="vanilla,pld", categories="writing,qa", limit=1, report=False):
    args = ["run", "--model", MODEL, "--methods", methods, "--categories", categories, "--limit", str(limit),
            "--max-new-tokens", "8", "--questions", questions, "--out", str(out), "--device", "cpu",
            "--dtype", "float64", "--matmul", "torch", *extra]
    return args if report else args + ["--no-report"]


def run_ok(args, capsys) -> str:
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.err


def answers(out, label="vanilla") -> dict[int, dict]:
    path = Path(out) / "answers" / f"{label}.jsonl"
    return {r["question_id"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def cell_files(out, cell) -> dict[str, bytes]:
    directory = Path(out) / "cells" / cell
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tokens(record) -> list:
    return [{key: choice[key] for key in ("output_ids", "turns", "accept_lengths", "new_tokens", "decoding_steps",
                                          "lossless")} for choice in record["choices"]]


# ---- (a) a Ray run equals a sequential run -------------------------------------------------------
def test_ray_run_equals_local_run(ray_cluster, questions, tmp_path, capsys):
    local, distributed = tmp_path / "local", tmp_path / "ray"
    run_ok(run_args(questions, local, limit=2), capsys)
    err = run_ok(run_args(questions, distributed, "--launcher", "ray", "--cells-per-group", "2", limit=2,
                          report=True), capsys)
    assert "4 cells" in err

    check = subprocess.run([sys.executable, str(CHECK_RUN), str(distributed), "--lossless", "pld"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    cells = sorted(p.name for p in (distributed / "cells").iterdir())
    assert cells == ["mt_bench-1of2", "mt_bench-2of2", "qa-1of2", "qa-2of2"]
    for cell in cells:
        done = json.loads((distributed / "cells" / cell / "DONE").read_text())
        assert len(done["questions"]) == 1 and done["labels"] == ["vanilla", "pld"]
        assert not (distributed / "cells" / cell / "FAILED").exists()

    for label in ("vanilla", "pld"):
        expected, got = answers(local, label), answers(distributed, label)
        assert list(got) == sorted(got) == sorted(expected) and len(got) == 4
        for qid in expected:
            assert "error" not in got[qid]
            assert tokens(got[qid]) == tokens(expected[qid]), (label, qid)
    assert any(len(r["choices"][0]["turns"]) == 2 for r in answers(distributed).values())  # a 2-turn question

    def tau(out):
        summary = metrics.summarize(metrics.load_run(out))
        return {(row.method, row.category): row.mean_accepted_tokens for row in summary.itertuples()}

    assert tau(distributed) == tau(local)
    assert tau(distributed)[("vanilla", "overall")] == 1.0

    local_config = json.loads((local / "config.json").read_text())
    ray_config = json.loads((distributed / "config.json").read_text())
    assert ray_config["config_hash"] == local_config["config_hash"]  # the launcher is not part of the config
    assert local_config["environment"]["launcher"] == "local"
    assert ray_config["environment"]["launcher"] == "ray"
    assert ray_config["environment"]["ray"]["cells_per_group"] == 2
    stats = json.loads((distributed / "method_stats.json").read_text())
    assert [stats[label]["status"] for label in ("vanilla", "pld")] == ["ok", "ok"]
    assert (distributed / "summary.csv").exists()


# ---- (b) retries and failed cells --------------------------------------------------------------
def test_cell_failing_once_is_retried(ray_cluster, questions, tmp_path, capsys, monkeypatch):
    out, marker = tmp_path / "run", tmp_path / "qa-failed-once"
    monkeypatch.setenv(FAIL_ENV, f"qa:{marker}")
    err = run_ok(run_args(questions, out, "--launcher", "ray"), capsys)
    assert marker.exists()  # the first attempt failed
    assert "failed" not in err
    for cell in ("mt_bench", "qa"):
        assert (out / "cells" / cell / "DONE").exists() and not (out / "cells" / cell / "FAILED").exists()
    for label in ("vanilla", "pld"):
        records = answers(out, label)
        assert len(records) == 2 and all("error" not in r and r["choices"] for r in records.values())


def test_cell_whose_worker_dies_once_is_retried(ray_cluster, questions, tmp_path, capsys, monkeypatch):
    out, marker = tmp_path / "run", tmp_path / "worker-died-once"
    monkeypatch.setenv(FAIL_ENV, f"exit:mt_bench:{marker}")  # the worker process ends, as a lost machine
    run_ok(run_args(questions, out, "--launcher", "ray", methods="vanilla"), capsys)
    assert marker.exists()
    assert (out / "cells" / "mt_bench" / "DONE").exists() and not (out / "cells" / "mt_bench" / "FAILED").exists()
    assert all("error" not in r and r["choices"] for r in answers(out).values())


def test_cell_always_failing_is_recorded_then_rerun(ray_cluster, questions, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = run_args(questions, out, "--launcher", "ray", "--cell-retries", "1")
    monkeypatch.setenv(FAIL_ENV, "qa")
    err = run_ok(args, capsys)
    assert "1 cell(s) failed after 1 retries: qa (RuntimeError" in err and "injected failure" in err
    failed = json.loads((out / "cells" / "qa" / "FAILED").read_text())
    assert "injected failure of cell qa" in failed["error"]
    assert not (out / "cells" / "qa" / "DONE").exists()
    assert (out / "cells" / "mt_bench" / "DONE").exists()
    for label in ("vanilla", "pld"):
        by_group = {r["group"]: r for r in answers(out, label).values()}
        assert "error" not in by_group["mt_bench"] and by_group["mt_bench"]["choices"]
        assert by_group["qa"]["choices"] == [] and "cell qa failed" in by_group["qa"]["error"]
    finished = cell_files(out, "mt_bench")

    monkeypatch.delenv(FAIL_ENV)
    err = run_ok(args, capsys)  # the same command: only the failed cell runs
    assert "(1 finished earlier)" in err
    assert cell_files(out, "mt_bench") == finished
    assert (out / "cells" / "qa" / "DONE").exists() and not (out / "cells" / "qa" / "FAILED").exists()
    for label in ("vanilla", "pld"):
        assert all("error" not in r and r["choices"] for r in answers(out, label).values())


# ---- (c) a killed run resumes without redoing finished work ------------------------------------
def test_killed_run_resumes_without_redoing_finished_cells(ray_cluster, questions, tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(questions, out, "--launcher", "ray")
    run_ok(args, capsys)
    first = {label: answers(out, label) for label in ("vanilla", "pld")}
    finished = cell_files(out, "mt_bench")
    qa_vanilla = (out / "cells" / "qa" / "answers" / "vanilla.jsonl").read_bytes()

    # killed while cell qa ran pld, before the driver merged anything: qa has only vanilla's answers
    (out / "cells" / "qa" / "DONE").unlink()
    (out / "cells" / "qa" / "answers" / "pld.jsonl").unlink()
    for path in (out / "answers").glob("*.jsonl"):
        path.unlink()

    err = run_ok(args, capsys)
    assert "(1 finished earlier)" in err
    assert cell_files(out, "mt_bench") == finished  # the finished cell was not run again
    assert (out / "cells" / "qa" / "answers" / "vanilla.jsonl").read_bytes() == qa_vanilla  # nor qa's vanilla
    assert (out / "cells" / "qa" / "DONE").exists()
    for label in ("vanilla", "pld"):
        again = answers(out, label)
        assert sorted(again) == sorted(first[label])
        for qid, record in again.items():
            assert tokens(record) == tokens(first[label][qid])
            redone = label == "pld" and record["group"] == "qa"
            assert (record["tstamp"] > first[label][qid]["tstamp"]) == redone, (label, qid)


def test_ray_run_resumes_a_local_run(ray_cluster, questions, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(run_args(questions, out, methods="vanilla"), capsys)
    before = answers(out)
    run_ok(run_args(questions, out, "--launcher", "ray"), capsys)  # adds pld; vanilla's answers are kept
    assert {q: r["tstamp"] for q, r in answers(out).items()} == {q: r["tstamp"] for q, r in before.items()}
    assert all(r["choices"][0]["lossless"] == "identical" for r in answers(out, "pld").values())


# ---- (d) without Ray, and flags ----------------------------------------------------------------
def test_launcher_ray_without_ray_says_how_to_install(questions, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = main(run_args(questions, tmp_path / "run", "--launcher", "ray"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "pip install '.[ray]'" in err and "make install" in err
    assert not (tmp_path / "run").exists()


def test_ray_flags_need_the_ray_launcher(questions, tmp_path, capsys):
    code = main(run_args(questions, tmp_path / "run", "--cells-per-group", "2"))
    err = capsys.readouterr().err
    assert code == 2 and "--cells-per-group" in err and "--launcher ray" in err


def test_run_help_explains_the_launcher(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--launcher", "--ray-address", "--cells-per-group", "--cpus-per-cell", "--cell-retries",
                 "--device-map"):
        assert flag in out, flag


def test_plan_cells():
    questions = [{"question_id": q, "group": g} for q, g in
                 [(1, "mt_bench"), (2, "mt_bench"), (3, "mt_bench"), (4, "qa"), (5, "qa")]]
    cells = plan_cells(questions, 1)
    assert [(c.cell_id, c.question_ids) for c in cells] == [("mt_bench", (1, 2, 3)), ("qa", (4, 5))]
    cells = plan_cells(questions, 2)
    assert [(c.cell_id, c.question_ids) for c in cells] == [
        ("mt_bench-1of2", (1,)), ("mt_bench-2of2", (2, 3)), ("qa-1of2", (4,)), ("qa-2of2", (5,))]
    assert [c.cell_id for c in plan_cells(questions, 5)][-2:] == ["qa-1of2", "qa-2of2"]


def test_cell_directory_is_the_run_directory_only_where_the_worker_sees_it(tmp_path):
    out = tmp_path / "run"
    directory, temporary = cell_directory(out, "abc", "qa")  # another machine: no OUT there
    assert temporary and directory.is_dir() and not directory.is_relative_to(out)
    directory.rmdir()
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"config_hash": "abc"}))
    assert cell_directory(out, "abc", "qa") == (out / "cells" / "qa", False)
    elsewhere, temporary = cell_directory(out, "other", "qa")  # a different run at that path is not written into
    assert temporary
    elsewhere.rmdir()


# ---- --device-map ------------------------------------------------------------------------------
def test_device_map_auto_runs_on_one_device(questions, tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(run_args(questions, out, "--device-map", "auto", methods="vanilla", categories="qa"), capsys)
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cpu" and config["environment"]["device_map"] == "auto"
    assert all("error" not in r for r in answers(out).values())
