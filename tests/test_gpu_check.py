"""`python -m bench gpu-check`: its CPU dry run end to end, and a GPU that torch cannot use."""
from __future__ import annotations

import json
import os
import stat

import pytest

from bench import device
from bench.__main__ import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An nvidia-smi on PATH that lists one GPU (torch here is CPU-only, so it cannot use it)."""
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)'\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")


def test_dry_run_on_cpu(tmp_path, capsys):
    code = main(["gpu-check", "--device", "cpu", "--out", str(tmp_path), "--families", "gemma3"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == []
    assert {row["method"] for row in report["lossless"]} >= {"vanilla", "hf-generate", "pld", "kangaroo", "medusa"}
    assert {(row["model"], row["dtype"]) for row in report["lossless"]} == {
        (kind, dtype) for kind in ("peaked", "random") for dtype in ("float16", "bfloat16")}
    assert all(row["diverged"] >= 0.9 * row["prompts"] == 9 for row in report["planted_bugs"])
    assert len(report["planted_bugs"]) == 2 * 2 * 2  # dtypes x bugs x methods
    assert report["profile"]["forward"] and (tmp_path / "profile.csv").is_file()
    assert "Verdict: **PASS**" in out and (tmp_path / "gpu_check.md").read_text() == out.rstrip("\n") + "\n"


def test_no_gpu_is_said_and_exits_cleanly(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(device, "visible_gpus", lambda: [])
    assert main(["gpu-check", "--out", str(tmp_path)]) == 0
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.md").exists()


def test_a_gpu_torch_cannot_use_is_an_error_with_the_fix(fake_nvidia_smi, questions_file, tmp_path, capsys):
    assert device.visible_gpus() == ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)"]
    problem = device.unusable_gpu_problem()
    assert "torch cannot use them" in problem and "DEVICE=cpu" in problem and "index-url" in problem
    assert main(["gpu-check", "--out", str(tmp_path)]) == 2
    assert "torch cannot use them" in capsys.readouterr().err
    assert main(["run", "--model", "tiny-llama-random", "--methods", "vanilla", "--limit", "1", "--questions",
                 str(questions_file), "--out", str(tmp_path / "run")]) == 2  # bench run stops too
    assert "torch cannot use them" in capsys.readouterr().err


def test_make_bench_stops_on_a_gpu_torch_cannot_use(fake_nvidia_smi):
    """`make bench` (with this python, and its install step taken as done) stops before any run."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["make", "bench", f"PY={sys.executable}", "STAMP=Makefile", "LIMIT=1"], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "torch cannot use them" in result.stderr and "No GPU: quick CPU profile" not in result.stdout
