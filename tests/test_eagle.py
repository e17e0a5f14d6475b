"""EAGLE-2: lossless dynamic-tree decoding on tiny models of three families, exact accept lengths
with an oracle drafter (and the target's KV entries in place), the tree's shape and options."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from methods import get
from tests.conftest import PROMPTS, assert_lossless, oracle_tree_accept_lengths, oracle_tree_candidates, tiny

SMALL = {"depth": 3, "top_k": 2, "total_tokens": 11}  # 2 + 4 + 4 grown nodes: all kept


def eagle(runtime, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeded random drafter of the tiny models
        return get("eagle2")(runtime, **options)


@pytest.mark.parametrize("options", [SMALL, {"depth": 4, "top_k": 3, "total_tokens": 8}, {}])
def test_lossless_on_tiny_models(tiny_model, options):
    runtime = tiny_model.runtime
    vanilla, method = get("vanilla")(runtime), eagle(runtime, **options)
    for prompt in PROMPTS:
        ids = tiny_model.tokenizer.encode(prompt)
        expected = vanilla.generate(ids, 30, tiny_model.stop_ids)
        got = method.generate(ids, 30, tiny_model.stop_ids)
        assert got.new_ids == expected.new_ids
        assert sum(got.accept_lengths) == len(got.new_ids)


def test_the_tree_is_closed_under_ancestors_and_bounded():
    runtime = tiny("tiny-llama-random").runtime
    method = eagle(runtime, depth=4, top_k=3, total_tokens=9)
    sizes = []
    original = method.grow

    def grow(*args):
        tree, nodes = original(*args)
        sizes.append(tree.size)
        parents = tree.parents.tolist()
        assert parents[0] == -1 and all(0 <= p < node for node, p in enumerate(parents) if node)
        assert nodes.shape == (tree.size,)
        return tree, nodes

    method.grow = grow
    ids = tiny("tiny-llama-random").tokenizer.encode(PROMPTS[0])
    method.generate(ids, 12, [])
    assert sizes and all(size == 9 for size in sizes)  # 3 + 9 + 9 + 9 grown, the best 8 kept


@pytest.mark.parametrize("name", ["tiny-llama-random", "tiny-gemma3-random"])
def test_oracle_drafter_gives_exact_accept_lengths_and_kv_in_place(name):
    """A drafter whose candidates after a node on the reference path put the reference's next
    token first (second, behind a wrong one, at a depth that changes with the step), and wrong
    tokens elsewhere: every step accepts the whole depth."""
    model = tiny(name)
    runtime = model.runtime
    ids = model.tokenizer.encode(PROMPTS[0])
    reference = get("vanilla")(runtime).generate(ids, 40, []).new_ids
    method = eagle(runtime, **SMALL)
    method.candidates = oracle_tree_candidates(reference)
    got = method.generate(ids, 40, [])
    assert got.new_ids == reference
    expected = oracle_tree_accept_lengths(reference)
    assert got.accept_lengths == expected
    # the target's cache holds exactly what a plain prefill of the same tokens writes
    tokens = ids + reference[:-1]
    cache = method.cache(len(tokens))
    fresh = runtime.new_cache(len(tokens))
    with torch.inference_mode():
        runtime.forward(torch.tensor([tokens]), fresh, 0)
    assert torch.allclose(cache.k[:, :, :, :len(tokens)], fresh.k, atol=1e-10)
    assert torch.allclose(cache.v[:, :, :, :len(tokens)], fresh.v, atol=1e-10)


def test_bad_options_are_refused_with_the_reason():
    runtime = tiny("tiny-llama-random").runtime
    with pytest.raises(ValueError, match="total_tokens must be at least 2"):
        eagle(runtime, total_tokens=1)
    with pytest.raises(ValueError, match="depth must be at least 1"):
        eagle(runtime, depth=0)
    with pytest.raises(ValueError, match="unknown option"):
        eagle(runtime, width=3)


@pytest.mark.parametrize("spec, options, budget", [
    ("eagle2", {}, ("depth", 6, 10, 60)),
    ("kangaroo", {"tree": True}, ("steps", 6, 10, 60)),
])
def test_tree_budgets_are_the_papers_on_vicuna_and_small_elsewhere(monkeypatch, spec, options, budget):
    """The papers' trees (top-k 10, 60 tokens) on the Vicuna models they were tuned for; at most
    16 verified tokens elsewhere; an explicit option always wins."""
    import methods.drafter
    runtime = tiny("tiny-llama-random").runtime
    depth_key, depth, top_k, total = budget
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = get(spec)(runtime, **options)
        assert small.settings["total_tokens"] <= 16 and small.settings["top_k"] < top_k
        monkeypatch.setattr(methods.drafter, "random_fallback_allowed", lambda model: True)
        monkeypatch.setattr(runtime, "alias", "vicuna-7b")
        paper = get(spec)(runtime, **options)
        assert (paper.settings[depth_key], paper.settings["top_k"], paper.settings["total_tokens"]) == (depth, top_k, total)
        assert get(spec)(runtime, **options, total_tokens=7).settings["total_tokens"] == 7


def test_held_out_acceptance_per_depth_matches_drafting_chain_by_chain():
    """evaluate_drafter runs every chain of a depth in one masked forward; drafting each chain on
    its own (a fresh cache: the true prefix, then the drafter's own features) must agree."""
    from methods.eagle import drafter_forward, evaluate_drafter, random_drafter, train_drafter
    from methods.train import Sequence, precompute_features
    runtime = tiny("tiny-llama-random").runtime
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 200, (14,), generator=generator)
    features = precompute_features(runtime, [Sequence(ids, torch.ones(14, dtype=torch.bool))], None, desc="test")
    drafter = random_drafter(runtime)
    ranking = torch.arange(runtime.config.vocab_size)
    # fitted to this very sequence, so that its chains get past depth 1 and 2
    train_drafter(runtime, drafter, features, features, ranking, runtime.config.vocab_size, minutes=1,
                  max_epochs=150, lr=3e-3, batch_tokens=8)
    with torch.no_grad():
        nn_head = runtime.lm_head.weight.detach().float()
        final = features.final[0]
        greedy = (final @ nn_head.T).argmax(-1)
        depths, T = 3, ids.shape[0]
        reached = [0] * (depths + 1)
        for t in range(T - 1):
            reached[0] += 1
            cache = runtime.new_cache(T + depths, num_layers=1)
            out = drafter_forward(runtime, drafter, final[:t + 1][None], ids[1:t + 2][None], cache, 0)[:, -1:]
            for depth in range(1, depths + 1):
                if depth > 1:
                    token = greedy[min(t + depth - 1, T - 1)].view(1, 1)
                    out = drafter_forward(runtime, drafter, out, token, cache, t + depth - 1)
                draft = (out[0, 0].float() @ nn_head.T).argmax()
                if t + depth >= T or draft != greedy[t + depth]:
                    break
                reached[depth] += 1
    expected = [round(reached[d + 1] / reached[d], 4) if reached[d] else 0.0 for d in range(depths)]
    result = evaluate_drafter(runtime, drafter, features, ranking, runtime.config.vocab_size, depths=depths)
    assert result["tokens"] == T - 1 and result["per_depth"] == expected
    assert expected[0] > 0.5 and expected[1] > 0  # the chains reach depth 2


def test_a_checkpoint_with_a_missing_or_misshapen_tensor_is_refused(tmp_path):
    from methods import checkpoints
    from methods.eagle import random_drafter
    runtime = tiny("tiny-llama-random").runtime
    state = random_drafter(runtime).state_dict()
    assert "fc.bias" in state and not any(k.startswith("layers.0.input_layernorm") for k in state)
    checkpoints.save(tmp_path / "good", state, {"method": "eagle2"})
    ids = tiny("tiny-llama-random").tokenizer.encode(PROMPTS[0])
    method = eagle(runtime, drafter=str(tmp_path / "good"), **SMALL)
    assert method.generate(ids, 16, []).new_ids == get("vanilla")(runtime).generate(ids, 16, []).new_ids
    broken = dict(state)
    del broken["fc.bias"]
    checkpoints.save(tmp_path / "missing", broken, {"method": "eagle2"})
    with pytest.raises(ValueError, match="fc.bias"):
        eagle(runtime, drafter=str(tmp_path / "missing"))
    broken = dict(state, **{"fc.weight": state["fc.weight"][:, :-1]})
    checkpoints.save(tmp_path / "misshapen", broken, {"method": "eagle2"})
    with pytest.raises(ValueError, match="fc.weight"):
        eagle(runtime, drafter=str(tmp_path / "misshapen"))


def test_a_published_eagle_folder_loads_and_reads_embedding_before_feature(tmp_path):
    """A folder in the published EAGLE layout (config.json as the EAGLE repo's Llama configs, with
    "bias"; pytorch_model.bin holding fc.weight/fc.bias, the layer without its input norm, the
    target's embedding and an old rotary buffer) loads; fc reads [embedding, feature] in that order;
    a stray tensor or a missing bias without "bias": false is refused."""
    from methods.eagle import drafter_forward, random_drafter
    model = tiny("tiny-llama-random")
    runtime, cfg = model.runtime, model.runtime.config
    torch.manual_seed(5)
    drafter = random_drafter(runtime)
    torch.nn.init.normal_(drafter.fc.weight, std=0.2)
    torch.nn.init.normal_(drafter.fc.bias, std=0.2)
    state = {k: v.clone() for k, v in drafter.state_dict().items()}
    state["embed_tokens.weight"] = runtime.embed_tokens.weight.detach().clone()
    state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(cfg.head_dim // 2)
    folder = tmp_path / "EAGLE-tiny"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": cfg.hidden_size, "num_hidden_layers": 1,
              "vocab_size": cfg.vocab_size, "bias": True}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "pytorch_model.bin")
    method = eagle(runtime, drafter=str(folder), **SMALL)
    assert all(torch.equal(method.drafter.state_dict()[k], drafter.state_dict()[k]) for k in drafter.state_dict())
    # the projection sees the embedding of token t + 1 first, then the feature of token t
    feature = torch.randn(1, 1, cfg.hidden_size, dtype=runtime.dtype)
    token = torch.tensor([[7]])
    seen = {}
    method.drafter.fc.register_forward_hook(lambda module, args, out: seen.update(input=args[0].clone()))
    with torch.inference_mode():
        x = runtime.embed(token)
        drafter_forward(runtime, method.drafter, feature, token, runtime.new_cache(4, num_layers=1), 0)
    assert torch.equal(seen["input"], torch.cat((x, feature), dim=-1))
    ids = model.tokenizer.encode(PROMPTS[1])
    assert method.generate(ids, 16, []).new_ids == get("vanilla")(runtime).generate(ids, 16, []).new_ids
    # no bias in the file: refused, unless the config says the projection has none
    del state["fc.bias"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing tensors fc.bias"):
        eagle(runtime, drafter=str(folder))
    (folder / "config.json").write_text(json.dumps(dict(config, bias=False)))
    assert torch.count_nonzero(eagle(runtime, drafter=str(folder)).drafter.fc.bias) == 0
    state["layers.0.input_layernorm.weight"] = torch.ones(cfg.hidden_size)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unexpected tensors layers.0.input_layernorm.weight"):
        eagle(runtime, drafter=str(folder))


@pytest.mark.parametrize("name", ["tiny-llama-random", "tiny-gemma3-random"])
def test_a_new_drafter_starts_by_predicting_the_current_feature(name):
    from methods.eagle import drafter_forward, initial_drafter
    runtime = tiny(name).runtime
    drafter = initial_drafter(runtime)
    features = torch.randn(1, 5, runtime.config.hidden_size, dtype=runtime.dtype)
    tokens = torch.randint(4, 200, (1, 5))
    with torch.no_grad():
        out = drafter_forward(runtime, drafter, features, tokens, runtime.new_cache(5, num_layers=1), 0)
    assert torch.allclose(out, features, atol=1e-12)


@pytest.mark.slow
def test_lossless_on_the_embedded_model(embedded, questions_file):
    """The committed drafter on the embedded model (its defaults: 32k draft vocabulary, a tree of
    at most 16 tokens): a short prompt, a second turn and a > 512-token article."""
    questions = [json.loads(line) for line in questions_file.open()]
    multi = next(q for q in questions if len(q["turns"]) == 2)
    article = next(q for q in questions if q["category"] == "summarization")
    runtime = embedded.runtime
    vanilla, method = get("vanilla")(runtime), get("eagle2")(runtime)
    assert method.checkpoints and method.settings["draft_vocab"] == 32768
    first = embedded.tokenizer.decode(vanilla.generate(embedded.prompt_ids(multi["turns"][:1], []), 16,
                                                       embedded.stop_ids).new_ids).strip()
    prompts = [embedded.prompt_ids(["What is the capital of France?"], []),
               embedded.prompt_ids(multi["turns"], [first]), embedded.prompt_ids(article["turns"], [])]
    assert len(prompts[-1]) > 512
    outcomes, accepted = [], 0
    for ids in prompts:
        expected = vanilla.generate(ids, 24, embedded.stop_ids)
        got = method.generate(ids, 24, embedded.stop_ids)
        outcomes.append(assert_lossless(embedded, ids, expected.new_ids, got.new_ids))
        accepted += sum(length - 1 for length in got.accept_lengths[1:])
    assert outcomes.count("identical") >= 2 and accepted > 0  # the trained drafter's tokens are accepted
