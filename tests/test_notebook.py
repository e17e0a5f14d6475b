"""notebooks/analysis.ipynb runs top to bottom on a run directory (a tiny model's run and profile)."""
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from bench import profile, runner
from bench.runner import RunSettings
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parents[1]


def test_analysis_notebook_runs(tmp_path, questions_file, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = runner.run(RunSettings(model="tiny-llama-random", methods="vanilla,pld,kangaroo", categories="qa,rag",
                                     limit=1, max_new_tokens=16, questions=str(questions_file),
                                     out=str(tmp_path / "run"), matmul="torch"))
        profile.write_profile(tiny("tiny-llama-random", "float32"), out, k_values=(1, 2, 4, 8, 16),
                              contexts=(16,), repeats=1, stream_bytes=1 << 24)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("SPEC_BENCH_RUN_DIR", str(out))
    notebook = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                     for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert str(out) in text
    assert "pld" in text and "kangaroo" in text
    assert "Leviathan" in text or "bound is" in text  # the profile's step costs were found
    images = sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
                 for output in cell.get("outputs", []))
    assert images >= 3
