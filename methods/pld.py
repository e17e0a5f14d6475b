"""Prompt lookup decoding (PLD): training-free drafts copied from the text so far.

Each step looks for the latest earlier occurrence of the last n tokens (n = max_ngram down to 1)
in the prompt plus the output so far, and drafts the tokens that followed it. One target forward
verifies the pending token and the drafts together; the longest prefix of drafts that matches the
target's greedy choices is accepted, plus the target's own token after it. When nothing matches it
decodes one token, exactly as `vanilla` does.
"""
from __future__ import annotations

import numpy as np
import torch

from methods import Generation, Method, Option, ProfileTable, Sampling, StepCosts, core, register


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
    default_sweep = ("pld",)
    verifies_every_step = {}  # the tiny models' greedy text repeats, so lookups match almost every step
    options = {
        "max_ngram": Option(int, 3, "longest suffix n-gram looked up (then shorter ones, down to 1)"),
        "num_draft": Option(int, 10, "tokens drafted per match"),
    }

    def __init__(self, model, **options):
        super().__init__(model, **options)
        if self.settings["max_ngram"] < 1 or self.settings["num_draft"] < 1:
            raise ValueError("pld: max_ngram and num_draft must be at least 1")

    @classmethod
    def profile(cls, runtime, cache, context, add):
        sequence = np.random.default_rng(0).integers(0, 1000, context)
        add("pld_lookup", 1, lambda: lookup_draft(sequence, 3, 10))

    @classmethod
    def step_costs(cls, profile: ProfileTable, options: dict) -> StepCosts | None:
        gamma, lookup = int(options.get("num_draft") or 0), profile.ms("pld_lookup", context="max")
        if not gamma or lookup is None or profile.forward(1) is None:
            return None
        return StepCosts(gamma, profile.forward(1), lookup, profile.forward(gamma + 1))

    def draft(self, tokens: np.ndarray) -> list[int]:
        """Drafts for the sequence `tokens` (prompt + output so far); tests may replace this."""
        return lookup_draft(tokens, self.settings["max_ngram"], self.settings["num_draft"])

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int],
                 sampling: Sampling | None = None) -> Generation:
        model = self.model
        state = core.start(prompt_ids, max_new_tokens, stop_ids, model.device, self.acceptance(sampling))
        cache = self.cache(len(prompt_ids) + max_new_tokens + self.settings["num_draft"] + 1)
        tokens = np.empty(len(prompt_ids) + max_new_tokens, dtype=np.int64)  # prompt + output so far (host)
        tokens[:len(prompt_ids)] = prompt_ids
        filled = len(prompt_ids)
        logits = model.forward(core.prompt_tensor(prompt_ids, model.device), cache, 0, last_only=True)
        core.commit_first(state, logits[0, -1])
        while not state.done:
            committed = state.new_ids[filled - len(prompt_ids):]
            tokens[filled:filled + len(committed)] = committed
            filled += len(committed)
            drafts = torch.tensor(self.draft(tokens[:filled])[:state.budget], dtype=torch.long, device=model.device)
            logits = model.forward(core.with_pending(state, drafts), cache, state.length)  # [1, 1 + k, V]
            core.verify_linear(state, logits[0], drafts)
        return state.result()
