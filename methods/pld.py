"""Prompt lookup decoding (PLD): training-free drafts copied from the text so far.

Each step looks for the latest earlier occurrence of the last n tokens (n = max_ngram down to 1)
in the prompt plus the output so far, and drafts the tokens that followed it. One target forward
verifies the pending token and the drafts together; the longest prefix of drafts that matches the
target's greedy choices is accepted, plus the target's own token after it. When nothing matches it
decodes one token, exactly as `vanilla` does.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from methods import Generation, Method, Option, greedy, register


def longest_accepted_prefix(drafts: list[int], target: list[int]) -> int:
    """How many drafts match the target's greedy tokens, in order. target[i] is the target's
    choice after the pending token and drafts[:i]; it has one entry more than drafts."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target[accepted]:
        accepted += 1
    return accepted


def lookup_draft(tokens: np.ndarray, max_ngram: int, num_draft: int) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the longest matching suffix
    n-gram (n <= max_ngram) of `tokens`, at most `num_draft` of them; [] when none matches."""
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), 0, -1):
        suffix = tokens[length - n:]
        # windows starting at 0 .. length-n-1 (the suffix itself excluded)
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        starts = np.flatnonzero((windows == suffix).all(axis=1))
        if starts.size:
            follow = int(starts[-1]) + n
            return tokens[follow:follow + num_draft].tolist()
    return []


@register("pld")
class PromptLookup(Method):
    description = "prompt lookup decoding: drafts copied from matching n-grams of the prompt and output"
    options = {
        "max_ngram": Option(int, 3, "longest suffix n-gram looked up (then shorter ones, down to 1)"),
        "num_draft": Option(int, 10, "tokens drafted per match"),
    }

    def __init__(self, model, **options):
        super().__init__(model, **options)
        if self.settings["max_ngram"] < 1 or self.settings["num_draft"] < 1:
            raise ValueError("pld: max_ngram and num_draft must be at least 1")

    def draft(self, tokens: np.ndarray) -> list[int]:
        """Drafts for the sequence `tokens` (prompt + output so far); tests may replace this."""
        return lookup_draft(tokens, self.settings["max_ngram"], self.settings["num_draft"])

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> Generation:
        started = time.perf_counter()
        model, stops = self.model, set(stop_ids)
        cache = self.cache(len(prompt_ids) + max_new_tokens + self.settings["num_draft"] + 1)
        tokens = np.empty(len(prompt_ids) + max_new_tokens, dtype=np.int64)  # prompt + output so far
        tokens[:len(prompt_ids)] = prompt_ids
        length = len(prompt_ids)

        logits = model.forward(torch.tensor([prompt_ids], device=model.device), cache, 0, last_only=True)
        pending = int(greedy(logits[0, -1]))  # committed, not yet in the cache
        prefill_seconds = time.perf_counter() - started
        tokens[length] = pending
        length += 1
        new_ids, accept_lengths, draft_lengths = [pending], [1], [0]
        while pending not in stops and len(new_ids) < max_new_tokens:
            budget = max_new_tokens - len(new_ids) - 1  # the bonus token always comes on top
            drafts = self.draft(tokens[:length])[:budget]
            step = torch.tensor([[pending] + drafts], device=model.device)  # [1, 1 + k]
            target = greedy(model.forward(step, cache, length - 1)[0]).tolist()  # [1 + k]
            accepted = longest_accepted_prefix(drafts, target)
            committed = drafts[:accepted] + [target[accepted]]
            for i, token in enumerate(committed):  # stop at the first stop token
                if token in stops:
                    committed = committed[:i + 1]
                    break
            tokens[length:length + len(committed)] = committed
            length += len(committed)
            new_ids += committed
            accept_lengths.append(len(committed))
            draft_lengths.append(len(drafts))
            pending = committed[-1]
        return Generation(new_ids, accept_lengths, draft_lengths, prefill_seconds=prefill_seconds)
