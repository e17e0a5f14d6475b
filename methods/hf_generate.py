"""transformers' own `generate` on the same weights (greedy, or sampled at T > 0): a reference for the runtime."""
from __future__ import annotations

import time

import torch

from methods import Generation, Method, Sampling, core, register
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
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int],
                 sampling: Sampling | None = None) -> Generation:
        hf_model = self.model.source_model
        threads = torch.get_num_threads()
        torch.set_num_threads(DEFAULT_TORCH_THREADS)  # the stock library runs as it would on its own
        try:
            return self._generate(hf_model, prompt_ids, max_new_tokens, stop_ids, sampling)
        finally:
            torch.set_num_threads(threads)

    def _generate(self, hf_model, prompt_ids, max_new_tokens, stop_ids, sampling) -> Generation:
        prompt = torch.tensor([prompt_ids], device=self.model.device)
        clock = _FirstTokenClock()
        if sampling and sampling.temperature > 0:
            # generate() draws from torch's global generator: seeded from this call's own one. Top-k
            # and top-p are switched off explicitly (a model's generation config may set them, e.g.
            # Gemma's top-k 64), so the tokens come from softmax(logits / T) as vanilla's do.
            torch.manual_seed(sampling.generator.initial_seed() if sampling.generator else 0)
            policy = dict(do_sample=True, temperature=sampling.temperature, top_k=0, top_p=1.0, min_p=None)
        else:
            policy = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        output = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), streamer=clock,
                                   max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=list(stop_ids),
                                   pad_token_id=stop_ids[0] if stop_ids else 0, num_beams=1, **policy)
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
