"""Peak memory measures the method alone (bench/device.py): no lossless-check allocations, no double
cache while a cache grows, and on CPU a figure that can go down from one method to the next."""
from __future__ import annotations

import json
import weakref

import pytest

import methods
from bench import device
from bench.runner import RunSettings, run
from tests.conftest import tiny

MB = 1e6
# A method's peak may exceed vanilla's by its reported extra memory give or take this: what the
# allocator keeps from the previous method after its memory is handed back (about 20 MB on the
# embedded model) and the activations of one verification (Medusa's 8-node tree: 8 float32 logit
# rows of 262,144 entries, 8 MB).
MARGIN_BYTES = 32 * MB


def test_a_growing_cache_is_freed_before_the_larger_one_is_allocated(monkeypatch):
    model = tiny("tiny-llama-random")
    method = methods.get("vanilla")(model.runtime)
    allocate = model.runtime.new_cache
    live: list[weakref.ref] = []

    def new_cache(*args, **kwargs):
        assert all(ref() is None for ref in live), "the old cache is still alive while the new one is allocated"
        cache = allocate(*args, **kwargs)
        live.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(model.runtime, "new_cache", new_cache)
    method.cache(100)
    method.cache(300)  # grows
    assert method.cache(200).max_len == 512  # kept


def test_cpu_peak_can_go_down_after_a_reset():
    model = tiny("tiny-llama-random")
    assert device.reset_peak_memory(model.runtime)
    block = bytearray(200 * 2 ** 20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    high = device.peak_memory_bytes(model.runtime)
    del block
    device.reset_peak_memory(model.runtime)
    assert device.peak_memory_bytes(model.runtime) < high - 150 * MB


@pytest.mark.slow
def test_method_peak_exceeds_vanilla_by_its_own_extra_memory(questions_file, tmp_path):
    """The draft-vocabulary Kangaroo holds an 84 MB copy of 32,768 LM-head rows, Medusa another; each
    method's peak is vanilla's plus its own extra memory. PLD, run after Kangaroo, holds nothing more
    than vanilla and must not inherit Kangaroo's peak."""
    out = tmp_path / "run"
    run(RunSettings(model="gemma-3-270m", methods="vanilla,kangaroo+draft_vocab=32768,pld,medusa", categories="qa",
                    limit=1, max_new_tokens=8, device="cpu", dtype="float32", matmul="torch",
                    questions=str(questions_file), out=str(out)))
    stats = json.loads((out / "method_stats.json").read_text())
    vanilla = stats["vanilla"]["peak_memory_bytes"]
    for label in ("kangaroo+draft_vocab=32768", "pld", "medusa"):
        extra, peak = stats[label]["extra_memory_bytes"], stats[label]["peak_memory_bytes"]
        assert (extra > 80 * MB) == (label != "pld")
        assert abs((peak - vanilla) - extra) < MARGIN_BYTES, (label, (peak - vanilla) / MB, extra / MB)
