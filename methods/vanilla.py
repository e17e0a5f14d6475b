"""Autoregressive greedy decoding on the runtime: the baseline every speedup is measured against."""
from __future__ import annotations

import time

import torch

from methods import Generation, Method, greedy, register


@register("vanilla")
class Vanilla(Method):
    description = "autoregressive greedy decoding on the common runtime (the speedup baseline)"

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> Generation:
        started = time.perf_counter()
        model, stops = self.model, set(stop_ids)
        cache = self.cache(len(prompt_ids) + max_new_tokens)
        prompt = torch.tensor([prompt_ids], device=model.device)  # [1, P]
        logits = model.forward(prompt, cache, start=0, last_only=True)  # [1, 1, V]
        new_ids: list[int] = []
        position = len(prompt_ids)
        prefill_seconds = None
        while True:
            token = int(greedy(logits[0, -1]))  # .item() waits for the device
            if prefill_seconds is None:
                prefill_seconds = time.perf_counter() - started
            new_ids.append(token)
            if token in stops or len(new_ids) >= max_new_tokens:
                break
            logits = model.forward(torch.tensor([[token]], device=model.device), cache, start=position)
            position += 1
        return Generation(new_ids, [1] * len(new_ids), prefill_seconds=prefill_seconds)
