"""The lossless check: is a method's greedy output vanilla's, up to floating-point near ties?

A k-row product may round differently from a 1-row product, so where vanilla's choice nearly ties
with another token a correct method may legitimately part from it (DESIGN.md §4). At the first
token where the two part ways, the prompt plus vanilla's tokens up to there is run again, and the
parting is a `near_tie` when vanilla's logits for the two tokens differ by less than

    tolerance = r(dtype) · max(1, |top-1 logit|)

    r = 1e-4                     float32 and float64 (the committed rule; generous there)
    r = C_HALF · eps(dtype)      float16 (eps 2^-10) and bfloat16 (eps 2^-7), C_HALF = 8

else `diverged` (a bug in the method). C_HALF = 8 is about ten times the largest difference
measured between a k-row and a one-row forward of the tiny models on CPU (0.7 eps·|top-1| in
float16, 0 in bfloat16), the same margin that float32's 1e-4 (839 eps·|top-1|) keeps over its
largest measured difference (80 eps·|top-1|). At |top-1| = 20 it allows 0.16 in float16 (10
steps of a logit there) and 1.25 in bfloat16. `python -m bench gpu-check` measures the same
difference on a GPU and says whether C_HALF covers it there.

Comparing vanilla's logits of the two tokens that were actually chosen (not merely its top-2) also
means that a method which picks a token far down vanilla's ranking is `diverged` even where
vanilla's top two happen to tie.
"""
from __future__ import annotations

import torch

FULL_PRECISION_RELATIVE_GAP = 1e-4
C_HALF = 8


def relative_tolerance(dtype: torch.dtype) -> float:
    """r(dtype): the near-tie tolerance per unit of max(1, |top-1 logit|)."""
    if dtype in (torch.float16, torch.bfloat16):
        return C_HALF * torch.finfo(dtype).eps
    return FULL_PRECISION_RELATIVE_GAP


def tolerance(dtype: torch.dtype, top1: float) -> float:
    return relative_tolerance(dtype) * max(1.0, abs(top1))


def first_difference(expected: list[int], got: list[int]) -> int | None:
    """Index of the first differing token (or of the end of the shorter list); None if equal."""
    if expected == got:
        return None
    return next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))


@torch.inference_mode()
def parting(runtime, prefix: list[int], expected: int, got: int) -> tuple[str, float, float]:
    """(verdict, gap, tolerance) where vanilla chose `expected` and the method `got` after
    `prefix`: vanilla's logits there are computed again (a fresh prefill in the model's dtype)."""
    logits = runtime.forward(torch.tensor([prefix], device=runtime.device), runtime.new_cache(len(prefix)), 0,
                             last_only=True)[0, -1].double()
    gap = abs(float(logits[expected] - logits[got]))
    allowed = tolerance(runtime.dtype, float(logits.max()))
    return ("near_tie" if gap < allowed else "diverged"), gap, allowed


def classify_tokens(runtime, prompt_ids: list[int], expected: list[int], got: list[int]) -> str:
    """identical / near_tie / diverged for one turn's new tokens after `prompt_ids`."""
    index = first_difference(expected, got)
    if index is None:
        return "identical"
    if index >= len(expected) or index >= len(got):
        return "diverged"  # one stopped early without a different token: not a tie
    return parting(runtime, prompt_ids + expected[:index], expected[index], got[index])[0]


def classify(model, question: dict, reference: dict, choice: dict) -> str:
    """identical / near_tie / diverged of a method's answer `choice` against vanilla's `reference`
    (both in the answer schema, with `output_ids` per turn). Later turns are compared only while
    the earlier ones are identical (each method's turn 2 prompt holds its own turn 1 answer)."""
    for turn, (expected, got) in enumerate(zip(reference["output_ids"], choice["output_ids"])):
        prompt_ids = model.prompt_ids(question["turns"][:turn + 1], reference["turns"][:turn])
        verdict = classify_tokens(model.runtime, prompt_ids, expected, got)
        if verdict != "identical":
            return verdict
    return "identical"
