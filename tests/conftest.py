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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, for modules of tiny-model tests: the tiny models gain nothing from more, and
    on a busy machine torch's OpenMP threads spin against other work (each small operation then
    waits for a scheduler slice). hf-generate, which runs the stock library at its default thread
    count, is held to one too."""
    import methods.hf_generate
    import methods.products
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(methods.products, "DEFAULT_TORCH_THREADS", 1)
        patch.setattr(methods.hf_generate, "DEFAULT_TORCH_THREADS", 1)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_lossless(model, prompt_ids: list[int], expected: list[int], got: list[int]) -> str:
    """Equal tokens, or a first difference at a near tie of vanilla's logits (bench/lossless.py).
    Returns "identical" or "near_tie"; fails on a real divergence."""
    from bench.lossless import first_difference, parting
    index = first_difference(expected, got)
    if index is None:
        return "identical"
    assert index < min(len(expected), len(got)), f"lengths differ: {len(expected)} vs {len(got)}"
    verdict, gap, allowed = parting(model.runtime, prompt_ids + expected[:index], expected[index], got[index])
    assert verdict == "near_tie", \
        f"diverged at new token {index}: expected {expected[index]}, got {got[index]} (logit gap {gap:.3g} >= {allowed:.3g})"
    return verdict


def oracle_tree_candidates(reference: list[int]):
    """A tree drafter's `candidates(outputs, paths, produced)` that knows `reference` (vanilla's
    tokens): after a node on the reference path it ranks the reference's next token first (second,
    behind a wrong one, at a depth 1..3 that changes with the step), wrong tokens elsewhere. With a
    tree of top-2 children 3 deep, every step accepts the whole depth (oracle_tree_accept_lengths)."""
    steps = {"count": 0, "produced": None}

    def candidates(outputs, paths, produced):
        if produced != steps["produced"]:
            steps["produced"] = produced
            steps["count"] += 1
        second_at = steps["count"] % 4  # the depth (1..3) whose right token ranks second; 0: none
        tokens = torch.zeros(len(paths), 2, dtype=torch.long)
        scores = torch.tensor([[-3.0, -4.0]]).repeat(len(paths), 1)
        for row, path in enumerate(paths):
            at = produced + len(path)
            right = reference[at] if at < len(reference) else 0
            wrong = (right + 1) % 200 + 4
            tokens[row] = torch.tensor([wrong, (wrong + 1) % 200 + 4])
            if tuple(reference[produced:at]) == path and at < len(reference):
                if second_at == len(path) + 1:
                    tokens[row], scores[row] = torch.tensor([wrong, right]), torch.tensor([-0.05, -0.1])
                else:
                    tokens[row], scores[row] = torch.tensor([right, wrong]), torch.tensor([0.0, -5.0])
        return tokens, scores

    return candidates


def oracle_tree_accept_lengths(reference: list[int], depth: int = 3) -> list[int]:
    """The accept_lengths of oracle_tree_candidates over `reference`: the prefill's token, then
    every step the whole depth and the target's token, as far as the reference goes."""
    expected, produced = [1], 1
    while produced < len(reference):
        accepted = min(depth, len(reference) - produced - 1)
        expected.append(accepted + 1)
        produced += accepted + 1
    return expected
