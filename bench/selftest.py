"""The lossless suite: every method against vanilla on a model, and planted bugs that it must catch.

Shared by the tests (on CPU) and `python -m bench gpu-check` (on a GPU): for each method variant,
greedy output on a set of prompts is classified against vanilla's (bench/lossless.py). A correct
method must come out `identical` or `near_tie` on every prompt; a method with a planted bug must
come out `diverged` on nearly every prompt, or the check has no power.

Planted bugs wrap the model's layer forward, so they hit every method's verification the same way
(any forward that writes several tokens after the prompt, i.e. a verification pass):
- `position_off_by_one`: the verified tokens are rotated one RoPE position too far;
- `slot_off_by_one`: the verified tokens are written one cache slot too late, so the slot before
  them keeps stale entries.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch

import methods
from bench.lossless import classify_tokens

PLANTED_BUGS = {
    "position_off_by_one": "verification rotates its tokens one RoPE position too far",
    "slot_off_by_one": "verification writes its tokens one KV-cache slot too late",
}


@contextlib.contextmanager
def planted_bug(runtime, kind: str):
    """Within the block, every forward of several tokens after slot 0 (a verification) has `kind`."""
    if kind not in PLANTED_BUGS:
        raise ValueError(f"unknown planted bug {kind!r}; valid: {', '.join(PLANTED_BUGS)}")
    correct = runtime.forward_layers

    def buggy(hidden, cache, start, positions=None, tree_mask=None, layers=None):
        count = hidden.shape[1]
        if start > 0 and count > 1:
            if positions is None:
                positions = torch.arange(start, start + count, device=hidden.device)
            if kind == "position_off_by_one":
                positions = positions + 1
            else:
                start += 1
        return correct(hidden, cache, start, positions, tree_mask, layers)

    runtime.forward_layers = buggy
    try:
        yield
    finally:
        del runtime.forward_layers  # the class's own method again


def label_of(name: str, options: dict) -> str:
    return "+".join([name] + [f"{k}={v}" for k, v in sorted(options.items())])


def method_variants() -> dict[str, tuple[str, dict]]:
    """label -> (name, options) of every registered method's `selftest_variants`."""
    return {label_of(name, options): (name, dict(options))
            for name, method in methods.available().items() for options in method.selftest_variants}


def planted_bug_variants() -> dict[str, tuple[str, dict]]:
    """The variants under which a method verifies several tokens at every step (its
    `verifies_every_step`): there a planted verification bug must show."""
    return {label_of(name, method.verifies_every_step): (name, dict(method.verifies_every_step))
            for name, method in methods.available().items() if method.verifies_every_step is not None}


def planted_bug_labels() -> list[str]:
    return list(planted_bug_variants())


@dataclass
class SuiteResult:
    verdicts: dict[str, list[str]] = field(default_factory=dict)  # label -> one verdict per prompt
    skipped: dict[str, str] = field(default_factory=dict)  # label -> why it could not be built

    def count(self, label: str, verdict: str) -> int:
        return self.verdicts.get(label, []).count(verdict)


def build_variants(runtime, labels: list[str] | None = None) -> tuple[dict, dict[str, str]]:
    """(label -> method instance, label -> reason it was skipped)."""
    built, skipped = {}, {}
    for label, (name, options) in {**method_variants(), **planted_bug_variants()}.items():
        if labels is not None and label not in labels:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # untrained drafters on tiny models say so
                built[label] = methods.get(name)(runtime, **options)
        except (ValueError, methods.MissingCheckpoint) as error:
            skipped[label] = str(error)
    return built, skipped


@torch.inference_mode()
def lossless_suite(runtime, prompts: list[list[int]], max_new_tokens: int, labels: list[str] | None = None,
                   bug: str | None = None, stop_ids: list[int] | None = None) -> SuiteResult:
    """Classify every method variant (or `labels`) against vanilla on each prompt; with `bug`, the
    methods run with that planted bug (vanilla's reference never does)."""
    stop_ids = stop_ids or []
    vanilla = methods.get("vanilla")(runtime)
    reference = [vanilla.generate(ids, max_new_tokens, stop_ids).new_ids for ids in prompts]
    built, skipped = build_variants(runtime, labels)
    result = SuiteResult(skipped=skipped)
    for label, method in built.items():
        if bug is not None and label == "vanilla":
            continue
        with planted_bug(runtime, bug) if bug else contextlib.nullcontext():
            outputs = [method.generate(ids, max_new_tokens, stop_ids).new_ids for ids in prompts]
        result.verdicts[label] = [classify_tokens(runtime, ids, expected, got)
                                  for ids, expected, got in zip(prompts, reference, outputs)]
    return result
