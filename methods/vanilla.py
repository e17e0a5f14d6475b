"""Autoregressive decoding on the runtime (greedy, or sampled at T > 0): the baseline of every speedup."""
from __future__ import annotations

import torch

from methods import Generation, Method, Sampling, core, register


@register("vanilla")
class Vanilla(Method):
    description = "autoregressive decoding on the common runtime (the speedup baseline)"
    default_sweep = ("vanilla",)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int],
                 sampling: Sampling | None = None) -> Generation:
        model = self.model
        state = core.start(prompt_ids, max_new_tokens, stop_ids, model.device, self.acceptance(sampling))
        cache = self.cache(len(prompt_ids) + max_new_tokens)
        logits = model.forward(core.prompt_tensor(prompt_ids, model.device), cache, 0, last_only=True)  # [1, 1, V]
        core.commit_first(state, logits[0, -1])
        while not state.done:  # one token per forward, chosen (greedy) or drawn (T > 0) by the rule
            logits = model.forward(state.pending, cache, state.length)  # [1, 1, V]
            core.verify_linear(state, logits[0], None)
        return state.result()
