"""Shared fixtures: tiny random models (float64, for strict equality) and the embedded model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.models import load_model

QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "spec_bench" / "question.jsonl"
TINY_MODELS = ("tiny-llama-random", "tiny-qwen2-random", "tiny-gemma3-random")
PROMPTS = (
    "What is the capital of France?",
    "Translate to German: the weather is nice today, and we will walk to the old bridge by the river.",
    "Summarize: " + "The committee met on Tuesday to discuss the budget for next year. " * 6,
)

_tiny_cache: dict[str, object] = {}


@pytest.fixture(scope="session")
def questions_file() -> Path:
    if not QUESTIONS.exists():
        pytest.skip(f"the Spec-Bench question file is not at {QUESTIONS}")
    return QUESTIONS


def tiny(name: str, dtype: str = "float64"):
    """A tiny random model, loaded once per session and dtype."""
    key = f"{name}/{dtype}"
    if key not in _tiny_cache:
        _tiny_cache[key] = load_model(name, device="cpu", dtype=dtype)
    model = _tiny_cache[key]
    model.runtime.set_matmul("torch")
    return model


@pytest.fixture(params=TINY_MODELS)
def tiny_model(request):
    return tiny(request.param)


@pytest.fixture(scope="session")
def embedded():
    """The embedded Gemma 3 270M in float32 (dequantized once, then loaded from the cache)."""
    model = load_model("gemma-3-270m", device="cpu", dtype="float32")
    yield model
    model.runtime.set_matmul("torch")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_lossless(model, prompt_ids: list[int], expected: list[int], got: list[int]) -> str:
    """Equal tokens, or a first difference where vanilla's top-2 logits nearly tie (DESIGN.md §4).
    Returns "identical" or "near_tie"; fails on a real divergence."""
    from bench.runner import NEAR_TIE_RELATIVE_GAP
    if got == expected:
        return "identical"
    index = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    assert index < min(len(expected), len(got)), f"lengths differ: {len(expected)} vs {len(got)}"
    runtime = model.runtime
    prefix = prompt_ids + expected[:index]
    with torch.inference_mode():
        logits = runtime.forward(torch.tensor([prefix]), runtime.new_cache(len(prefix)), 0, last_only=True)[0, -1]
    top = torch.topk(logits.double(), 2).values
    gap = float(top[0] - top[1])
    assert gap < NEAR_TIE_RELATIVE_GAP * max(1.0, abs(float(top[0]))), \
        f"diverged at new token {index}: expected {expected[index]}, got {got[index]} (top-2 gap {gap:.3g})"
    return "near_tie"
