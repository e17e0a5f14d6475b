"""The runtime against transformers itself: same logits and the same greedy tokens."""
from __future__ import annotations

import json

import pytest
import torch

from methods import get, kernels
from tests.conftest import PROMPTS, tiny


def hf_logits(model, ids):
    with torch.no_grad():
        return model.runtime.source_model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("matmul", ["torch", "blas"])
def test_logits_match_transformers(tiny_model, matmul):
    runtime = tiny_model.runtime
    runtime.set_matmul(matmul)
    for prompt in PROMPTS:
        ids = tiny_model.tokenizer.encode(prompt)
        with torch.inference_mode():
            ours = runtime.forward(torch.tensor([ids]), runtime.new_cache(len(ids)), 0)[0]
        reference = hf_logits(tiny_model, ids)
        assert ours.shape == reference.shape
        assert torch.allclose(ours, reference, rtol=0, atol=1e-10), (ours - reference).abs().max()


def test_prompts_are_longer_than_the_sliding_window():
    model = tiny("tiny-gemma3-random")
    window = model.runtime.config.sliding_window
    assert window and max(len(model.tokenizer.encode(p)) for p in PROMPTS) > 4 * window
    assert model.runtime.config.layer_types.count("sliding") == 3


def test_incremental_decoding_matches_a_full_forward(tiny_model):
    runtime = tiny_model.runtime
    ids = tiny_model.tokenizer.encode(PROMPTS[2])
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        full = runtime.forward(tokens, runtime.new_cache(len(ids)), 0)[0]
        cache = runtime.new_cache(len(ids))
        pieces = [runtime.forward(tokens[:, :7], cache, 0)[0]]
        position = 7
        for size in (1, 3, 1, 5):  # single tokens and k-token chunks, as speculative methods verify
            pieces.append(runtime.forward(tokens[:, position:position + size], cache, position)[0])
            position += size
        for position in range(position, len(ids)):
            pieces.append(runtime.forward(tokens[:, position:position + 1], cache, position)[0])
    assert torch.allclose(torch.cat(pieces), full, rtol=0, atol=1e-10)


def test_layer_range_forward_composes(tiny_model):
    runtime = tiny_model.runtime
    ids = torch.tensor([tiny_model.tokenizer.encode(PROMPTS[0])])
    n = runtime.config.num_layers
    with torch.inference_mode():
        full = runtime.forward_layers(runtime.embed(ids), runtime.new_cache(64), 0)
        cache = runtime.new_cache(64)
        shallow = runtime.forward_layers(runtime.embed(ids), cache, 0, layers=range(0, 2))
        deep = runtime.forward_layers(shallow, cache, 0, layers=range(2, n))
    assert torch.equal(full, deep)


def test_tree_forward_matches_each_path_decoded_linearly(tiny_model):
    """Nodes of a token tree, verified in one forward with a tree mask and depth positions, get
    the logits a linear forward of their path gives; moving a path's KV entries into place then
    continues exactly like linear decoding."""
    runtime = tiny_model.runtime
    prefix = tiny_model.tokenizer.encode(PROMPTS[1])
    P = len(prefix)
    # tree: 0:a  1:a>b  2:a>c  3:d  4:d>e  5:d>e>f
    tokens = [40, 50, 60, 70, 80, 90]
    parents = [-1, 0, 0, -1, 3, 4]
    ancestors = []
    for node, parent in enumerate(parents):
        chain = [node] + (ancestors[parent] if parent >= 0 else [])
        ancestors.append(chain)
    tree_mask = torch.zeros(6, 6, dtype=torch.bool)
    for node, chain in enumerate(ancestors):
        tree_mask[node, chain] = True
    depth = torch.tensor([len(chain) - 1 for chain in ancestors])
    with torch.inference_mode():
        cache = runtime.new_cache(P + 16)
        runtime.forward(torch.tensor([prefix]), cache, 0)
        tree_logits = runtime.forward(torch.tensor([tokens]), cache, P, positions=P + depth, tree_mask=tree_mask)[0]
        for node, chain in enumerate(ancestors):
            path = [tokens[i] for i in reversed(chain)]
            linear = runtime.forward(torch.tensor([prefix + path]), runtime.new_cache(P + 8), 0)[0, -1]
            assert torch.allclose(tree_logits[node], linear, rtol=0, atol=1e-10), node
        # accept the path d>e>f: its entries sit at slots P+3..P+5 and move to P..P+2
        cache.move(torch.tensor([P + 3, P + 4, P + 5]), P)
        following = runtime.forward(torch.tensor([[100]]), cache, P + 3)[0, -1]
        expected = runtime.forward(torch.tensor([prefix + [70, 80, 90, 100]]), runtime.new_cache(P + 8), 0)[0, -1]
    assert torch.allclose(following, expected, rtol=0, atol=1e-10)
    assert cache.positions[P:P + 3].tolist() == [P, P + 1, P + 2]


def test_vanilla_greedy_matches_transformers_generate(tiny_model):
    vanilla = get("vanilla")(tiny_model.runtime)
    reference = get("hf-generate")(tiny_model.runtime)
    distinct = set()
    for prompt in PROMPTS:
        ids = tiny_model.tokenizer.encode(prompt)
        ours = vanilla.generate(ids, 24, tiny_model.stop_ids)
        theirs = reference.generate(ids, 24, tiny_model.stop_ids)
        assert ours.new_ids == theirs.new_ids
        assert ours.accept_lengths == [1] * len(ours.new_ids)
        assert len(ours.new_ids) == 24 or ours.new_ids[-1] in tiny_model.stop_ids
        distinct |= set(ours.new_ids)
    assert len(distinct) > 5  # the random model does not just repeat one token


def test_vanilla_stops_at_a_stop_token():
    model = tiny("tiny-llama-random")
    vanilla = get("vanilla")(model.runtime)
    ids = model.tokenizer.encode(PROMPTS[0])
    free = vanilla.generate(ids, 12, []).new_ids
    stopped = vanilla.generate(ids, 12, [free[4]])
    first = free.index(free[4])
    assert stopped.new_ids == free[:first + 1]
    assert sum(stopped.accept_lengths) == len(stopped.new_ids)


@pytest.mark.slow
def test_embedded_model_matches_transformers_beyond_the_sliding_window(embedded, questions_file):
    runtime = embedded.runtime
    assert runtime.config.sliding_window == 512 and runtime.config.num_layers == 18
    article = next(q for q in map(json.loads, questions_file.open()) if q["category"] == "summarization")
    long_ids = embedded.prompt_ids(article["turns"], [])
    assert len(long_ids) > 600
    runtime.set_matmul("torch")
    with torch.inference_mode():
        ours = runtime.forward(torch.tensor([long_ids]), runtime.new_cache(len(long_ids)), 0)[0, -64:]
    reference = hf_logits(embedded, long_ids)[-64:]
    assert (ours - reference).abs().max() < 1e-3
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
    short_ids = embedded.prompt_ids(["What is the capital of France?"], [])
    for ids in (short_ids, long_ids):
        theirs = get("hf-generate")(runtime).generate(ids, 16, embedded.stop_ids).new_ids
        for matmul in ("torch", "blas") + (("kernel",) if kernels.load() is not None else ()):
            runtime.set_matmul(matmul)
            assert get("vanilla")(runtime).generate(ids, 16, embedded.stop_ids).new_ids == theirs, matmul
    runtime.set_matmul("torch")


@pytest.mark.parametrize("plus_one", [False, True])
def test_norm_fast_path_gives_the_same_numbers_and_works_under_autograd(plus_one):
    from methods.runtime import RMSNorm
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6, plus_one=plus_one)
    norm.weight.data.normal_(0, 0.5)
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        fast = norm(x)  # float32 without gradients: the fast path (and its cached 1 + w)
    norm.weight.requires_grad_(True)
    slow = norm(x)  # with a weight that needs gradients: the reference formula
    assert torch.equal(fast, slow.detach())
    # the cached factor made under inference mode must be usable when autograd records
    norm.weight.requires_grad_(False)
    x.requires_grad_(True)
    norm(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # an in-place update of the weight is picked up
    with torch.no_grad():
        norm.weight.add_(1.0)
    with torch.inference_mode():
        updated = norm(x.detach())
    norm.weight.requires_grad_(True)
    assert torch.equal(updated, norm(x.detach()).detach())
    # a norm built under inference mode (e.g. a method's module made inside a profile)
    with torch.inference_mode():
        built = RMSNorm(64, 1e-6, plus_one=plus_one)
        built.weight.copy_(norm.weight.detach())
        assert torch.equal(built(x.detach()), updated)


@pytest.mark.parametrize("with_mask", [False, True])
def test_grouped_attention_matches_sdpa(with_mask):
    from methods.runtime import _grouped_attention
    torch.manual_seed(0)
    q = torch.randn(1, 4, 3, 16, dtype=torch.float64)  # 4 query heads sharing 2 KV heads, 3 new tokens
    keys, values = torch.randn(1, 2, 7, 16, dtype=torch.float64), torch.randn(1, 2, 7, 16, dtype=torch.float64)
    mask = None
    if with_mask:
        mask = torch.zeros(3, 7, dtype=torch.float64)
        mask[0, 5:] = mask[1, 6:] = mask[2, :2] = float("-inf")
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3,
                                                                enable_gqa=True)
    assert torch.allclose(_grouped_attention(q, keys, values, mask, 0.3), expected, rtol=0, atol=1e-12)


def test_auto_matmul_path_is_measured_among_the_cpu_paths():
    from methods.products import MATMUL_PATHS, pick_matmul_path
    runtime = tiny("tiny-llama-random", "float32").runtime
    try:
        path = pick_matmul_path(runtime, "auto")
        assert path in MATMUL_PATHS and runtime.matmul == path
        assert pick_matmul_path(runtime, "torch") == "torch" and runtime.lm_head.host_path is None
    finally:
        runtime.set_matmul("torch")
