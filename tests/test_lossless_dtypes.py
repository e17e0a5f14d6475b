"""The lossless check in every dtype (bench/lossless.py): no correct method is called `diverged` in
float16 or bfloat16, and planted bugs are called `diverged` on at least 90% of prompts.

The models are the peaked tiny ones (bench/tiny.py): trained for seconds so that, like a trained
model, their top-1 logit stands out; on the flat random models about 40% of bfloat16 positions are
near ties, where a bug and rounding cannot be told apart.
"""
from __future__ import annotations

import json

import pytest
import torch

from bench import lossless
from bench.models import load_model
from bench.selftest import PLANTED_BUGS, lossless_suite, planted_bug_labels
from bench.tiny import TINY_FAMILIES, synthetic_prompts

HALF = ("float16", "bfloat16")
_models: dict[tuple[str, str], object] = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def peaked(family: str, dtype: str):
    if (family, dtype) not in _models:
        _models[family, dtype] = load_model(f"tiny-{family}-peaked", device="cpu", dtype=dtype)
    return _models[family, dtype]


def test_tolerance_follows_the_dtype():
    assert lossless.tolerance(torch.float32, 20.0) == pytest.approx(2e-3)  # the committed 1e-4 rule
    assert lossless.tolerance(torch.float32, 0.3) == pytest.approx(1e-4)  # at least 1 times r
    assert lossless.tolerance(torch.float64, 20.0) == pytest.approx(2e-3)
    assert lossless.tolerance(torch.float16, 20.0) == pytest.approx(8 * 2 ** -10 * 20)  # 0.156: 10 steps of 2^-6
    assert lossless.tolerance(torch.bfloat16, 20.0) == pytest.approx(8 * 2 ** -7 * 20)  # 1.25: 10 steps of 2^-3


def test_peaked_models_are_peaked():
    """The premise of the tests below: near ties (by the bfloat16 tolerance) are rare."""
    model = peaked("llama", "float32")
    prompts = torch.tensor(synthetic_prompts(8, length=40))
    with torch.inference_mode():
        logits = model.runtime.forward(prompts, model.runtime.new_cache(prompts.shape[1], batch=len(prompts)), 0)[:, 3:]
    top = logits.topk(2, dim=-1).values
    relative_gap = (top[..., 0] - top[..., 1]) / top[..., 0].abs().clamp(min=1)
    assert float((relative_gap < lossless.relative_tolerance(torch.bfloat16)).float().mean()) < 0.02


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_no_correct_method_diverges_in_half_precision(family, dtype):
    model = peaked(family, dtype)
    result = lossless_suite(model.runtime, synthetic_prompts(6), 32)
    assert {"vanilla", "hf-generate", "pld", "kangaroo", "medusa"} <= set(result.verdicts), result.skipped
    for label, verdicts in result.verdicts.items():
        assert "diverged" not in verdicts, f"{label} in {dtype}: {verdicts}"


@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
@pytest.mark.parametrize("dtype", ("float32",) + HALF)
def test_planted_bugs_diverge_on_nine_prompts_in_ten(bug, dtype):
    rates, labels = {}, planted_bug_labels()
    assert {"pld", "medusa"} <= set(labels)
    for family in TINY_FAMILIES:
        result = lossless_suite(peaked(family, dtype).runtime, synthetic_prompts(10), 32, labels=labels, bug=bug)
        for label in labels:
            rates[family, label] = result.count(label, "diverged") / len(result.verdicts[label])
    assert min(rates.values()) >= 0.9, rates


def test_the_reported_float16_near_tie_is_not_called_diverged(questions_file):
    """The case that showed the float32 rule wrong in float16: Medusa on the random tiny Gemma3,
    question 321, parts from vanilla at a top-2 gap of 0.0005 (5e-5 in float32)."""
    question = next(q for q in map(json.loads, questions_file.open()) if q["question_id"] == 321)
    model = load_model("tiny-gemma3-random", device="cpu", dtype="float16")
    import methods
    ids = model.prompt_ids(question["turns"][:1], [])
    expected = methods.get("vanilla")(model.runtime).generate(ids, 48, model.stop_ids).new_ids
    got = methods.get("medusa")(model.runtime).generate(ids, 48, model.stop_ids).new_ids
    index = lossless.first_difference(expected, got)
    assert index is not None, "the near tie no longer shows; pick another case"
    verdict, gap, allowed = lossless.parting(model.runtime, ids + expected[:index], expected[index], got[index])
    assert gap < 1e-3 and verdict == "near_tie", (gap, allowed)
