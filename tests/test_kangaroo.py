"""Kangaroo: lossless for every exit layer and draft vocabulary, exact acceptance with oracle
drafts, and checkpoints (ours and the published format) loaded strictly."""
from __future__ import annotations

import json

import pytest
import torch

from methods import MissingCheckpoint, get
from methods.kangaroo import KangarooAdapter, load_adapter
from tests.conftest import PROMPTS, assert_lossless, oracle_tree_accept_lengths, oracle_tree_candidates, tiny


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
@pytest.mark.parametrize("draft_vocab", [0, 64])
def test_lossless_on_tiny_models(tiny_model, exit_layer, draft_vocab):
    runtime = tiny_model.runtime
    runtime.vocab_ranking = lambda: torch.arange(runtime.config.vocab_size).flip(0)
    vanilla = get("vanilla")(runtime)
    # threshold 0: every step drafts `steps` tokens, so verification of k tokens is exercised
    kangaroo = get("kangaroo")(runtime, exit_layer=exit_layer, threshold=0.0, steps=4, draft_vocab=draft_vocab)
    assert kangaroo.exit_layer == exit_layer
    assert (kangaroo.head_ids is None) == (draft_vocab == 0)
    for prompt in PROMPTS:
        ids = tiny_model.tokenizer.encode(prompt)
        expected = vanilla.generate(ids, 30, tiny_model.stop_ids)
        got = kangaroo.generate(ids, 30, tiny_model.stop_ids)
        assert got.new_ids == expected.new_ids
        assert sum(got.accept_lengths) == len(got.new_ids)
        assert all(d == min(4, 30 - sum(got.accept_lengths[:i]) - 1) for i, d in enumerate(got.draft_lengths) if i)


def oracle(method, reference: list[int], wrong_at: list[int | None], stop_after: list[int]):
    """Feed vanilla's own tokens as drafts. At step s the draft at depth wrong_at[s] is wrong, and
    the draft after depth stop_after[s] comes with probability 0 (the early exit). Returns the
    accept_lengths this must produce."""
    steps = method.settings["steps"]
    state = {"step": 0, "depth": 0, "start": None}

    def propose(adapted, produced, sampling=None):
        if state["start"] is None or produced <= state["start"]:
            state["start"], state["depth"] = produced, 0  # a new step begins at this position
        step, depth = state["step"], produced - state["start"]
        if depth >= stop_after[step % len(stop_after)]:
            state["step"] += 1
            state["start"] = None
            return torch.tensor([0.0]), torch.tensor([[0]]), None
        token = reference[produced] if produced < len(reference) else 0
        if wrong_at[step % len(wrong_at)] == depth:
            token = (token + 1) % 200 + 4
        if depth + 1 >= steps:
            state["step"] += 1
            state["start"] = None
        return torch.tensor([1.0]), torch.tensor([[token]]), None

    method.propose = propose
    expected, produced, step = [1], 1, 0
    while produced < len(reference):
        drafts = min(stop_after[step % len(stop_after)], steps, len(reference) - produced - 1)
        wrong = wrong_at[step % len(wrong_at)]
        accepted = drafts if wrong is None or wrong >= drafts else wrong
        expected.append(accepted + 1)
        produced += accepted + 1
        step += 1
    return expected


@pytest.mark.parametrize("name", ["tiny-llama-random", "tiny-gemma3-random"])
def test_oracle_drafts_give_exact_accept_lengths(name):
    model = tiny(name)
    ids = model.tokenizer.encode(PROMPTS[2])
    reference = get("vanilla")(model.runtime).generate(ids, 40, []).new_ids
    kangaroo = get("kangaroo")(model.runtime, steps=5)
    expected = oracle(kangaroo, reference, wrong_at=[None, 0, 3, None, 1], stop_after=[5, 5, 5, 2, 5, 0])
    got = kangaroo.generate(ids, 40, [])
    assert got.new_ids == reference
    assert got.accept_lengths == expected
    assert max(expected) == 6 and 1 in expected[1:]


TREE = {"tree": True, "threshold": 0.0, "steps": 3, "top_k": 2, "total_tokens": 11}  # 2 + 4 + 4 grown: all kept


@pytest.mark.parametrize("options", [TREE, {"tree": True, "threshold": 0.0, "steps": 4, "top_k": 3, "total_tokens": 8},
                                     {"tree": True, "draft_vocab": 64}])
def test_tree_variant_lossless_on_tiny_models(tiny_model, options):
    runtime = tiny_model.runtime
    runtime.vocab_ranking = lambda: torch.arange(runtime.config.vocab_size).flip(0)
    vanilla, kangaroo = get("vanilla")(runtime), get("kangaroo")(runtime, **options)
    for prompt in PROMPTS:
        ids = tiny_model.tokenizer.encode(prompt)
        got = kangaroo.generate(ids, 30, tiny_model.stop_ids)
        assert got.new_ids == vanilla.generate(ids, 30, tiny_model.stop_ids).new_ids
        assert sum(got.accept_lengths) == len(got.new_ids)


@pytest.mark.parametrize("name", ["tiny-llama-random", "tiny-gemma3-random"])
def test_tree_variant_oracle_gives_exact_accept_lengths_and_both_caches_in_place(name):
    """Candidates that rank the reference's next token first after every node on the reference
    path (second, behind a wrong one, at a depth that changes with the step) and wrong tokens
    elsewhere: every step accepts the whole depth. Afterwards the target's cache and the
    adapter's cache hold exactly what a plain prefill of the same tokens writes."""
    model = tiny(name)
    runtime = model.runtime
    ids = model.tokenizer.encode(PROMPTS[0])
    reference = get("vanilla")(runtime).generate(ids, 40, []).new_ids
    kangaroo = get("kangaroo")(runtime, **TREE)
    kangaroo.candidates = oracle_tree_candidates(reference)
    got = kangaroo.generate(ids, 40, [])
    assert got.new_ids == reference
    expected = oracle_tree_accept_lengths(reference)
    assert got.accept_lengths == expected
    tokens = ids + reference[:-1]
    fresh = runtime.new_cache(len(tokens))
    with torch.inference_mode():
        runtime.forward(torch.tensor([tokens]), fresh, 0)
        shallow = runtime.forward_layers(runtime.embed(torch.tensor([tokens])), runtime.new_cache(len(tokens)), 0,
                                         layers=range(kangaroo.exit_layer))
        adapter_fresh = runtime.new_cache(len(tokens), num_layers=1)
        runtime.forward_block(kangaroo.adapter.layers[0], shallow, adapter_fresh, 0)
    cache, adapter_cache = kangaroo.cache(len(tokens)), kangaroo.draft_cache("adapter", len(tokens), num_layers=1)
    assert torch.allclose(cache.k[:, :, :, :len(tokens)], fresh.k, atol=1e-10)
    assert torch.allclose(cache.v[:, :, :, :len(tokens)], fresh.v, atol=1e-10)
    # the adapter's entries of the last step's accepted drafts are written when the next step starts
    written = len(tokens) - (expected[-1] - 1)
    assert torch.allclose(adapter_cache.k[:, :, :, :written], adapter_fresh.k[:, :, :, :written], atol=1e-10)
    assert torch.allclose(adapter_cache.v[:, :, :, :written], adapter_fresh.v[:, :, :, :written], atol=1e-10)


def test_tree_options_need_tree_true_and_sane_values():
    runtime = tiny("tiny-llama-random").runtime
    with pytest.raises(ValueError, match="add tree=true"):
        get("kangaroo")(runtime, top_k=3)
    with pytest.raises(ValueError, match="total_tokens must be at least 2"):
        get("kangaroo")(runtime, tree=True, total_tokens=1)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        get("kangaroo")(runtime, tree=True, top_k=0)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        get("kangaroo")(runtime, tree=True, steps=0)
    method = get("kangaroo")(runtime, tree=True)
    assert (method.settings["top_k"], method.settings["total_tokens"]) == (4, 16)


def test_overhead_counts_the_adapter_and_the_draft_head():
    model = tiny("tiny-llama-random")
    h = model.runtime.config.hidden_size
    kv = model.runtime.config.num_kv_heads * model.runtime.config.head_dim
    full = get("kangaroo")(model.runtime)
    assert full.overhead().trained_params == 2 * h * h + 2 * h * kv + 2 * h  # q, o, k, v, two norms
    model.runtime.vocab_ranking = lambda: torch.arange(model.runtime.config.vocab_size)
    small = get("kangaroo")(model.runtime, draft_vocab=100)
    extra = small.overhead().extra_memory_bytes - full.overhead().extra_memory_bytes
    assert extra == 100 * h * 8  # the copied rows of the LM head, float64


def write_published(folder, model, state=None):
    """An adapter folder in the published format: a 1-layer LlamaConfig and pytorch_model.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.runtime.config
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
                                                    "hidden_size": cfg.hidden_size, "model_type": "llama"}))
    if state is None:
        generator = torch.Generator().manual_seed(3)
        state = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64)
                 for k, v in KangarooAdapter(model.runtime).state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    return state


def test_published_adapter_loads_with_all_six_tensors(tmp_path):
    model = tiny("tiny-llama-random")
    state = write_published(tmp_path / "published", model)
    assert sorted(state) == ["layers.0.input_layernorm.weight", "layers.0.self_attn.k_proj.weight",
                             "layers.0.self_attn.o_proj.weight", "layers.0.self_attn.q_proj.weight",
                             "layers.0.self_attn.v_proj.weight", "norm.weight"]
    adapter, _ = load_adapter(tmp_path / "published", model.runtime)
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, state[key].to(value.dtype))
    method = get("kangaroo")(model.runtime, adapter=str(tmp_path / "published"), threshold=0.0)
    assert method.checkpoints and all(len(h) == 64 for h in method.checkpoints.values())
    ids = model.tokenizer.encode(PROMPTS[0])
    assert method.generate(ids, 20, []).new_ids == get("vanilla")(model.runtime).generate(ids, 20, []).new_ids


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("norm.weight"), "missing tensors norm.weight"),
    (lambda s: s.__setitem__("layers.0.mlp.up_proj.weight", torch.zeros(2, 2)), "unexpected tensors"),
    (lambda s: s.__setitem__("layers.0.self_attn.q_proj.weight", torch.zeros(8, 64)), "(8, 64)"),
])
def test_malformed_adapters_are_refused(tmp_path, damage, message):
    model = tiny("tiny-llama-random")
    state = {k: v.clone() for k, v in KangarooAdapter(model.runtime).state_dict().items()}
    damage(state)
    write_published(tmp_path / "bad", model, state)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_adapter(tmp_path / "bad", model.runtime)


def test_vicuna_without_an_adapter_says_where_to_get_one(monkeypatch):
    model = tiny("tiny-llama-random")
    monkeypatch.delenv("KANGAROO_ADAPTER", raising=False)
    monkeypatch.setattr(model.runtime, "alias", "vicuna-7b")
    with pytest.raises(MissingCheckpoint, match="KANGAROO_ADAPTER"):
        get("kangaroo")(model.runtime)


def test_training_saves_a_checkpoint_that_loads(tmp_path):
    """A few distillation steps on a tiny model: the loss falls, and the saved folder loads and decodes losslessly."""
    from methods.train import Sequence
    from methods import checkpoints
    from methods.kangaroo import train_adapter
    from methods.train import precompute_features
    model = tiny("tiny-llama-random")
    runtime = model.runtime
    generator = torch.Generator().manual_seed(0)
    sequences = [Sequence(torch.randint(4, 200, (48,), generator=generator), torch.ones(48, dtype=torch.bool))
                 for _ in range(6)]
    features = precompute_features(runtime, sequences, exit_layer=2)
    adapter = KangarooAdapter(runtime).to(dtype=runtime.dtype)
    adapter.initialize_from(runtime, 2)
    report = train_adapter(runtime, adapter, features, features, torch.arange(runtime.config.vocab_size),
                           candidates=260, minutes=1, max_epochs=20, lr=3e-3, batch_tokens=96)
    assert report.steps == 60 and report.losses[-1] < report.losses[0]
    checkpoints.save(tmp_path / "ours", adapter.state_dict(), {"method": "kangaroo", "options": {"exit_layer": 2}})
    method = get("kangaroo")(runtime, adapter=str(tmp_path / "ours"), threshold=0.0)
    assert method.exit_layer == 2
    ids = model.tokenizer.encode(PROMPTS[1])
    assert method.generate(ids, 20, []).new_ids == get("vanilla")(runtime).generate(ids, 20, []).new_ids


@pytest.mark.slow
@pytest.mark.parametrize("draft_vocab, tree", [(0, False), (32768, False), (32768, True)])
def test_lossless_on_the_embedded_model(embedded, questions_file, draft_vocab, tree):
    questions = [json.loads(line) for line in questions_file.open()]
    multi = next(q for q in questions if len(q["turns"]) == 2)
    article = next(q for q in questions if q["category"] == "summarization")
    runtime = embedded.runtime
    vanilla = get("vanilla")(runtime)
    kangaroo = get("kangaroo")(runtime, threshold=0.0, steps=4, draft_vocab=draft_vocab, tree=tree)
    first = embedded.tokenizer.decode(vanilla.generate(embedded.prompt_ids(multi["turns"][:1], []), 16,
                                                       embedded.stop_ids).new_ids).strip()
    prompts = [embedded.prompt_ids(["What is the capital of France?"], []),
               embedded.prompt_ids(multi["turns"], [first]), embedded.prompt_ids(article["turns"], [])]
    assert len(prompts[-1]) > 512
    outcomes = []
    for ids in prompts:
        expected = vanilla.generate(ids, 24, embedded.stop_ids)
        got = kangaroo.generate(ids, 24, embedded.stop_ids)
        outcomes.append(assert_lossless(embedded, ids, expected.new_ids, got.new_ids))
        assert max(got.draft_lengths) == 4  # a tree: its depth
    assert outcomes.count("identical") >= 2


def test_checkpoint_recommendations_are_the_defaults(tmp_path):
    from methods import checkpoints
    model = tiny("tiny-llama-random")
    adapter = KangarooAdapter(model.runtime).to(dtype=model.runtime.dtype)
    checkpoints.save(tmp_path / "ck", adapter.state_dict(), {"method": "kangaroo", "options": {"exit_layer": 3},
                                                            "recommended": {"threshold": 0.3, "steps": 2,
                                                                            "draft_vocab": 64,
                                                                            "tree": {"threshold": 0.1, "top_k": 3,
                                                                                     "total_tokens": 7}}})
    model.runtime.vocab_ranking = lambda: torch.arange(model.runtime.config.vocab_size).flip(0)
    method = get("kangaroo")(model.runtime, adapter=str(tmp_path / "ck"))
    assert (method.exit_layer, method.settings["threshold"], method.settings["steps"]) == (3, 0.3, 2)
    assert method.settings["draft_vocab"] == 64 and method.head_ids.numel() == 64
    method = get("kangaroo")(model.runtime, adapter=str(tmp_path / "ck"), draft_vocab=0)  # the paper's full head
    assert method.settings["draft_vocab"] == 0 and method.head_ids is None
    method = get("kangaroo")(model.runtime, adapter=str(tmp_path / "ck"), threshold=0.9)
    assert method.settings["threshold"] == 0.9 and method.settings["steps"] == 2
    # the tree variant's own tuned defaults apply only with tree=true, over the chain's
    method = get("kangaroo")(model.runtime, adapter=str(tmp_path / "ck"), tree=True)
    assert {k: method.settings[k] for k in ("threshold", "steps", "top_k", "total_tokens", "draft_vocab")} == \
        {"threshold": 0.1, "steps": 2, "top_k": 3, "total_tokens": 7, "draft_vocab": 64}
