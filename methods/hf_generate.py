"""transformers' own greedy `generate` on the same weights: a reference for the runtime's speed."""
from __future__ import annotations

import time

import torch

from methods import Generation, Method, core, register
from methods.products import DEFAULT_TORCH_THREADS


@register("hf-generate")
class HFGenerate(Method):
    description = "transformers' own greedy generate() on the same weights (reference for the runtime)"
    default_sweep = ("hf-generate",)

    def __init__(self, model, **options):
        super().__init__(model, **options)
        if model.source_model is None:
            raise ValueError("hf-generate needs the transformers model the runtime was loaded from")

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> Generation:
        hf_model = self.model.source_model
        threads = torch.get_num_threads()
        torch.set_num_threads(DEFAULT_TORCH_THREADS)  # the stock library runs as it would on its own
        try:
            return self._generate(hf_model, prompt_ids, max_new_tokens, stop_ids)
        finally:
            torch.set_num_threads(threads)

    def _generate(self, hf_model, prompt_ids, max_new_tokens, stop_ids) -> Generation:
        prompt = torch.tensor([prompt_ids], device=self.model.device)
        clock = _FirstTokenClock()
        output = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, streamer=clock,
                                   max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=list(stop_ids),
                                   pad_token_id=stop_ids[0] if stop_ids else 0, num_beams=1,
                                   temperature=None, top_p=None, top_k=None)
        new_ids = core.until_stop(output[0, len(prompt_ids):].tolist(), set(stop_ids))  # generate pads after it
        return Generation(new_ids, [1] * len(new_ids), prefill_seconds=clock.first_token_seconds)


class _FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives (its first call is the prompt)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.calls = 0
        self.first_token_seconds = None

    def put(self, tokens) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_seconds = time.perf_counter() - self.started

    def end(self) -> None:
        pass
