"""Draft acceptance statistics of answer records (one entry per target forward in accept_lengths and
draft_lengths), under the names vLLM's speculative decoding metrics use (DESIGN.md §6):

- `draft acceptance rate`: accepted drafts ÷ proposed drafts;
- `mean acceptance length`: 1 + accepted drafts ÷ target forwards that had drafts (the bonus token
  included, over the steps that drafted; τ counts every forward, the prefill and the steps that
  drafted nothing included);
- `accepted tokens per position`: for draft position i, the forwards that accepted more than i
  drafts ÷ those that proposed more than i.
"""
from __future__ import annotations


def succeeded(record: dict) -> bool:
    """A question counts when it has no error and at least one choice."""
    return not record.get("error") and bool(record.get("choices"))


def acceptance_counts(records: list[dict]) -> tuple[int, int]:
    """(accepted drafts, proposed drafts) over the target forwards that had drafts."""
    accepted = proposed = 0
    for record in filter(succeeded, records):
        for choice in record["choices"]:
            for accept_length, drafts in zip(
                choice.get("accept_lengths", []), choice.get("draft_lengths", [])
            ):
                if drafts > 0:
                    accepted += accept_length - 1
                    proposed += drafts
    return accepted, proposed


def per_position_acceptance(records: list[dict]) -> list[float]:
    """Acceptance rate of draft position i (0-based), as vLLM reports it.

    rate[i] = number of target forwards that accepted more than i drafts ÷ number that proposed
    more than i drafts. The list is as long as the longest draft.
    """
    proposed: list[int] = []
    accepted: list[int] = []
    for record in filter(succeeded, records):
        for choice in record["choices"]:
            for accept_length, drafts in zip(
                choice.get("accept_lengths", []), choice.get("draft_lengths", [])
            ):
                if drafts > len(proposed):
                    grow = drafts - len(proposed)
                    proposed += [0] * grow
                    accepted += [0] * grow
                for position in range(drafts):
                    proposed[position] += 1
                for position in range(min(max(accept_length - 1, 0), drafts)):
                    accepted[position] += 1
    return [a / p for a, p in zip(accepted, proposed)]


def vllm_acceptance(records: list[dict]) -> dict:
    """The statistics above, plus their counts, for method_stats.json and summary.md."""
    accepted, proposed = acceptance_counts(records)
    drafting = sum(1 for record in filter(succeeded, records) for choice in record["choices"]
                   for drafts in choice.get("draft_lengths", []) if drafts > 0)
    return {"draft acceptance rate": accepted / proposed if proposed else None,
            "mean acceptance length": 1 + accepted / drafting if drafting else None,
            "accepted tokens per position": [round(rate, 4) for rate in per_position_acceptance(records)],
            "drafting steps": drafting, "proposed drafts": proposed, "accepted drafts": accepted}
