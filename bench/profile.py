"""`python -m bench profile`: what one step of each method costs on this device.

Times a target forward over k new tokens at a few context lengths (the verify-cost curve that
bounds every speculative method), the LM head alone, Kangaroo's draft step (full and truncated
vocabulary) and its deep-layer verification, and PLD's lookup. Each figure is the min and median
of several runs after a warm-up, with a device sync before every clock read. Writes
DIR/profile.csv with the columns component,k,context,ms_min,ms_median.
"""
from __future__ import annotations

import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.models import LoadedModel
from bench.runner import sync

K_VALUES = (1, 2, 4, 8, 16, 32, 64)
CONTEXTS = (128, 1024)
COLUMNS = ["component", "k", "context", "ms_min", "ms_median"]


def timed(function, device: torch.device, repeats: int = 5) -> tuple[float, float]:
    """(min, median) milliseconds of `function()` over `repeats` runs after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        function()
        sync(device)
        times.append(1000 * (time.perf_counter() - started))
    return min(times), statistics.median(times)


@torch.inference_mode()
def profile_rows(model: LoadedModel, k_values=K_VALUES, contexts=CONTEXTS, repeats: int = 5) -> list[dict]:
    import methods
    from methods.pld import lookup_draft
    runtime, device = model.runtime, model.runtime.device
    vocab = runtime.config.vocab_size
    rows = []

    def add(component, k, context, function):
        low, median = timed(function, device, repeats)
        rows.append({"component": component, "k": k, "context": context, "ms_min": round(low, 3),
                     "ms_median": round(median, 3)})
        print(f"[profile] {component:24} k={k:<3} context={context:<5} min {low:8.2f} ms  median {median:8.2f} ms",
              file=sys.stderr)

    cache = runtime.new_cache(max(contexts) + max(k_values) + 8)
    generator = torch.Generator().manual_seed(0)
    for context in contexts:
        prefix = torch.randint(0, vocab, (1, context), generator=generator).to(device)
        runtime.forward(prefix, cache, 0, last_only=True)  # fill the cache (timing ignores its content)
        for k in k_values:
            tokens = torch.randint(0, vocab, (1, k), generator=generator).to(device)
            add("forward", k, context, lambda: runtime.forward(tokens, cache, context))
    hidden = {k: torch.randn(1, k, runtime.config.hidden_size, dtype=runtime.dtype, device=device) for k in k_values}
    for k in k_values:
        add("lm_head", k, 0, lambda: runtime.lm_head(hidden[k]))

    context = contexts[0]
    try:
        for draft_vocab in (0, 32768):
            kangaroo = methods.get("kangaroo")(runtime, draft_vocab=draft_vocab)
            name = "kangaroo_draft" + ("" if draft_vocab == 0 else f"_vocab{draft_vocab}")
            adapter_cache = kangaroo.adapter_cache(cache.max_len)
            token = torch.tensor([[1]], device=device)
            shallow = range(0, kangaroo.exit_layer)

            def draft_step():
                feature = runtime.forward_layers(runtime.embed(token), cache, context, layers=shallow)
                adapted = runtime.forward_block(kangaroo.adapter.layers[0], feature, adapter_cache, context)
                return kangaroo.propose(adapted, 0)
            add(name, 1, context, draft_step)
        deep = range(kangaroo.exit_layer, runtime.config.num_layers)
        for k in k_values[:5]:
            def verify(k=k):
                out = runtime.forward_layers(hidden[k], cache, context, layers=deep)
                return runtime.logits(out).argmax(-1)
            add("kangaroo_verify", k, context, verify)
    except methods.MissingCheckpoint as error:
        print(f"[profile] kangaroo skipped: {error}", file=sys.stderr)

    for context_length in contexts:
        sequence = np.random.default_rng(0).integers(0, 1000, context_length)
        add("pld_lookup", 1, context_length, lambda: lookup_draft(sequence, 3, 10))
    return rows


def write_profile(model: LoadedModel, out: Path, **options) -> Path:
    rows = profile_rows(model, **options)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "profile.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path
