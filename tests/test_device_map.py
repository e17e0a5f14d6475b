"""`--device-map auto`: a model's decoder layers split over several devices and run as a pipeline.

On this CPU-only machine the split layout (a KV cache per layer, the hidden state handed from
layer to layer) is forced onto one device, where every method must give the tokens and accept
lengths of the unsplit model; the placement planner and the device map handed to transformers
are checked against invented GPU sizes. The test on real GPUs runs where two or more are visible.
"""
from __future__ import annotations

import pytest
import torch

from bench import models
from bench.errors import UserError
from bench.launch import RayOptions
from bench.tiny import tiny_hf_config
from bench.models import hub_device_map, load_model, plan_layer_devices, resolve_device_map
from methods import get
from tests.conftest import PROMPTS, TINY_MODELS

GIB = 2 ** 30


def generate_all(model, device_label: str = "") -> dict[str, list]:
    """Tokens and accept lengths of vanilla, PLD, Kangaroo (drafting every step) and Medusa."""
    runtime = model.runtime
    runtime.vocab_ranking = lambda: torch.arange(runtime.config.vocab_size).flip(0)
    torch.manual_seed(1)  # the same random adapter and heads on every call
    methods = {"vanilla": get("vanilla")(runtime), "pld": get("pld")(runtime),
               "kangaroo": get("kangaroo")(runtime, exit_layer=2, threshold=0.0, steps=4, draft_vocab=64),
               "medusa": get("medusa")(runtime, tree="chain_4")}
    results = {}
    for name, method in methods.items():
        for prompt in PROMPTS:
            out = method.generate(model.tokenizer.encode(prompt), 24, model.stop_ids)
            results[f"{name}/{prompt[:12]}"] = (out.new_ids, out.accept_lengths)
    return results


@pytest.mark.parametrize("name", TINY_MODELS)
def test_split_layout_gives_the_tokens_of_the_unsplit_model(name):
    model = load_model(name, device="cpu", dtype="float64")
    runtime = model.runtime
    expected = generate_all(model)
    runtime.place_layers(split=True)
    cache = runtime.new_cache(8)
    assert isinstance(cache.k, list) and len(cache.k) == runtime.config.num_layers
    assert isinstance(runtime.new_cache(8, num_layers=1).k, torch.Tensor)  # an adapter's cache stays whole
    assert generate_all(model) == expected
    runtime.place_layers()
    assert runtime.layer_devices is None  # all on one device: no split


def test_a_split_model_keeps_norm_and_head_with_the_embedding():
    model = load_model("tiny-llama-random", device="cpu", dtype="float32")
    model.runtime.lm_head.to("meta")
    with pytest.raises(ValueError, match="LM head is on meta"):
        model.runtime.place_layers()


def test_plan_uses_as_few_devices_as_hold_the_model():
    layers = [2 * GIB] * 8
    assert plan_layer_devices(layers, GIB, [40 * GIB, 40 * GIB]) == [0] * 8
    # 16 GiB of layers + 1 GiB home on two 12 GiB GPUs (9.6 usable each): split, in order
    devices = plan_layer_devices(layers, GIB, [12 * GIB, 12 * GIB])
    assert devices == sorted(devices) and set(devices) == {0, 1}
    used = [sum(size for size, d in zip(layers, devices) if d == i) for i in (0, 1)]
    assert used[0] + GIB <= 0.8 * 12 * GIB and used[1] <= 0.8 * 12 * GIB
    # three GPUs, the first nearly full: its share is small
    devices = plan_layer_devices(layers, GIB, [4 * GIB, 24 * GIB, 24 * GIB])
    assert devices.count(0) == 1 and devices == sorted(devices)
    with pytest.raises(UserError, match="needs 17.0 GiB of weights.*have 16.0 GiB free"):
        plan_layer_devices(layers, GIB, [8 * GIB, 8 * GIB])


def test_device_map_for_transformers_splits_only_the_layers(monkeypatch):
    config = tiny_hf_config("llama")
    meta_bytes = {}  # one layer and the rest, in float32, to size two invented GPUs
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    meta_bytes["layer"] = sum(p.numel() for p in meta.model.layers[0].parameters()) * 4
    meta_bytes["home"] = sum(p.numel() for p in meta.parameters()) * 4 - 4 * meta_bytes["layer"]
    free = int((meta_bytes["home"] + 2.5 * meta_bytes["layer"]) / 0.8)  # room for home and 2 of the 4 layers
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free, 2 * free))
    placement = hub_device_map(config, torch.float32, torch.device("cuda:1"))  # GPUs 1 and 2
    assert [placement[f"model.layers.{i}"] for i in range(4)] == [1, 1, 2, 2]
    assert {k: v for k, v in placement.items() if ".layers." not in k} == {
        "model.embed_tokens": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    for name, _ in meta.named_parameters():  # every weight has a place
        assert any(name == key or name.startswith(key + ".") for key in placement), name
    assert models.describe_placement(placement).startswith("cuda:1 2 layers, cuda:2 2 layers")


def test_resolve_device_map():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_device_map(None, cuda) is None and resolve_device_map("none", cuda) is None
    assert resolve_device_map("auto", cpu) is None  # the plain CPU load
    assert resolve_device_map("auto", cuda) == "auto"
    with pytest.raises(UserError, match="valid: auto, none"):
        resolve_device_map("balanced", cpu)


def test_gpus_per_cell_must_be_positive():
    assert RayOptions.from_flags(None, None, None, None, 2).gpus_per_cell == 2
    with pytest.raises(UserError, match="--gpus-per-cell"):
        RayOptions.from_flags(None, None, None, None, 0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_split_over_two_gpus_gives_the_tokens_of_one(tmp_path, monkeypatch):
    """A checkpoint loaded with the device map --device-map auto builds, its layers forced onto two GPUs."""
    import dataclasses

    from transformers import AutoModelForCausalLM
    one = load_model("tiny-llama-random", device="cuda:0", dtype="float32")
    expected = generate_all(one)
    one.runtime.source_model.save_pretrained(tmp_path)
    monkeypatch.setattr(models, "plan_layer_devices", lambda layers, home, free, headroom=0.2: [0, 0, 1, 1])
    placement = hub_device_map(one.runtime.source_model.config, torch.float32, torch.device("cuda:0"))
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map=placement).eval()
    split = dataclasses.replace(one, runtime=models.runtime_from_hf(hf_model))
    assert [d.index for d in split.runtime.layer_devices] == [0, 0, 1, 1]
    assert generate_all(split) == expected
