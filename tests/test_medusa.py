"""Medusa-1: lossless tree verification for several trees, exact acceptance with oracle heads (and
the accepted path's KV entries in place), and checkpoints (ours and the published format)."""
from __future__ import annotations

import json

import pytest
import torch

from methods import get
from methods.medusa import build_heads, load_heads, read_tree
from tests.conftest import PROMPTS, assert_lossless, tiny

TREES = ["mc_sim_7b_63", "chain_4", "small"]


@pytest.fixture
def small_tree(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"paths": [[0], [1], [2], [0, 0], [1, 0], [0, 1], [0, 0, 0]]}))
    return str(path)


def test_unknown_tree_lists_the_named_ones():
    with pytest.raises(ValueError, match="mc_sim_7b_63"):
        read_tree("no_such_tree")


@pytest.mark.parametrize("tree", TREES)
def test_lossless_on_tiny_models(tiny_model, tree, small_tree):
    runtime = tiny_model.runtime
    vanilla = get("vanilla")(runtime)
    medusa = get("medusa")(runtime, tree=small_tree if tree == "small" else tree)
    accepted_more = False
    for prompt in PROMPTS:
        ids = tiny_model.tokenizer.encode(prompt)
        expected = vanilla.generate(ids, 30, tiny_model.stop_ids)
        got = medusa.generate(ids, 30, tiny_model.stop_ids)
        assert got.new_ids == expected.new_ids
        assert sum(got.accept_lengths) == len(got.new_ids)
        accepted_more |= max(got.accept_lengths) > 1
    assert medusa.settings["share_lm_head"] is True


def test_lossless_with_per_head_lm_heads_and_fewer_heads():
    model = tiny("tiny-gemma3-random")
    ids = model.tokenizer.encode(PROMPTS[1])
    expected = get("vanilla")(model.runtime).generate(ids, 30, []).new_ids
    for options in ({"share_lm_head": False}, {"num_heads": 2}):
        medusa = get("medusa")(model.runtime, **options)
        assert medusa.generate(ids, 30, []).new_ids == expected


@pytest.mark.parametrize("name", ["tiny-llama-random", "tiny-gemma3-random"])
@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "chain_4"])
def test_oracle_heads_give_exact_accept_lengths_and_kv_in_place(name, tree):
    """Heads whose rank-0 candidates are vanilla's own next tokens (rank 1 elsewhere); at chosen
    depths the rank-0 token is wrong while rank 1 holds the right one (so a tree with rank-1
    branches still accepts it, and a chain stops there)."""
    model = tiny(name)
    runtime = model.runtime
    ids = model.tokenizer.encode(PROMPTS[0])
    reference = get("vanilla")(runtime).generate(ids, 40, []).new_ids
    medusa = get("medusa")(runtime, tree=tree)
    wrong_at = [None, 0, 2, 1, None, 3]
    calls = {"step": 0}

    def propose(normed, produced):
        step = calls["step"]
        calls["step"] += 1
        top = torch.zeros(4, max(2, medusa.tree.top_k), dtype=torch.long)
        for depth in range(4):
            right = reference[produced + depth] if produced + depth < len(reference) else 0
            wrong = (right + 1) % 200 + 4
            top[depth] = wrong
            if wrong_at[step % len(wrong_at)] == depth:
                top[depth, 1] = right
            else:
                top[depth, 0] = right
        return top[medusa.node_head, medusa.node_rank]

    medusa.propose = propose
    got = medusa.generate(ids, 40, [])
    assert got.new_ids == reference
    # what the tree can accept when the right token sits at rank 1 at depth d
    expected, produced, step = [1], 1, 0
    paths = set(medusa.tree.rank_paths())
    while produced < len(reference):
        wrong = wrong_at[step % len(wrong_at)]
        accepted, path = 0, ()
        for depth in range(4):
            rank = 1 if wrong == depth else 0
            if path + (rank,) not in paths:
                break
            path += (rank,)
            accepted += 1
        accepted = min(accepted, len(reference) - produced - 1)
        expected.append(accepted + 1)
        produced += accepted + 1
        step += 1
    assert got.accept_lengths == expected
    assert max(expected) == 5
    # the cache now holds exactly what a plain prefill of the same tokens writes
    tokens = ids + reference[:-1]
    cache = medusa.cache(len(tokens))  # the same cache, already large enough
    fresh = runtime.new_cache(len(tokens))
    with torch.inference_mode():
        runtime.forward(torch.tensor([tokens]), fresh, 0)
    assert torch.allclose(cache.k[:, :, :, :len(tokens)], fresh.k, atol=1e-10)
    assert torch.allclose(cache.v[:, :, :, :len(tokens)], fresh.v, atol=1e-10)
    assert cache.positions[:len(tokens)].tolist() == list(range(len(tokens)))


def write_published(folder, model, heads: int = 5, config_heads: int = 2):
    """medusa_lm_head.pt with per-head LM heads, and a config that (as published) undercounts them."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.runtime.config
    (folder / "config.json").write_text(json.dumps({"medusa_num_heads": config_heads, "medusa_num_layers": 1}))
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) * 0.05
             for k, v in build_heads(cfg.hidden_size, cfg.vocab_size, heads, False).state_dict().items()}
    torch.save(state, folder / "medusa_lm_head.pt")
    return state


def test_published_heads_are_counted_from_the_keys(tmp_path):
    model = tiny("tiny-llama-random")
    state = write_published(tmp_path / "published", model)
    assert {"0.0.linear.weight", "0.0.linear.bias", "0.1.weight", "4.1.weight"} <= set(state)
    heads, shared, _ = load_heads(tmp_path / "published", model.runtime)
    assert len(heads) == 5 and shared is False
    assert torch.equal(heads[4][1].weight, state["4.1.weight"])
    medusa = get("medusa")(model.runtime, heads=str(tmp_path / "published"))
    ids = model.tokenizer.encode(PROMPTS[1])
    assert medusa.generate(ids, 24, []).new_ids == get("vanilla")(model.runtime).generate(ids, 24, []).new_ids
    hidden, vocab = model.runtime.config.hidden_size, model.runtime.config.vocab_size
    # the default tree (mc_sim_7b_63) is 4 deep: the fifth head never runs and is not held or counted
    assert medusa.settings["num_heads"] == 4 and len(medusa.heads) == 4
    assert medusa.overhead().trained_params == 4 * (hidden * hidden + hidden + vocab * hidden)
    chain = get("medusa")(model.runtime, heads=str(tmp_path / "published"), tree="chain_2")
    assert chain.settings["num_heads"] == 2 and chain.overhead().trained_params == 2 * (hidden * hidden + hidden + vocab * hidden)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("1.0.linear.bias"), "missing tensors 1.0.linear.bias"),
    (lambda s: s.__setitem__("0.2.weight", torch.zeros(3)), "unexpected tensors 0.2.weight"),
    (lambda s: s.__setitem__("2.1.weight", torch.zeros(7, 64)), r"2.1.weight: checkpoint \(7, 64\)"),
    (lambda s: s.__setitem__("7.0.linear.bias", torch.zeros(64)), "head tensors must be named"),
])
def test_malformed_heads_are_refused(tmp_path, damage, message):
    model = tiny("tiny-llama-random")
    state = write_published(tmp_path / "bad", model)
    damage(state)
    torch.save(state, tmp_path / "bad" / "medusa_lm_head.pt")
    with pytest.raises(ValueError, match=message):
        load_heads(tmp_path / "bad", model.runtime)


def test_training_lowers_the_loss_and_saves_loadable_heads(tmp_path):
    from methods.train import Sequence
    from methods import checkpoints
    from methods.medusa import train_heads
    from methods.train import precompute_features
    model = tiny("tiny-llama-random")
    runtime = model.runtime
    generator = torch.Generator().manual_seed(0)
    sequences = [Sequence(torch.randint(4, 200, (40,), generator=generator), torch.ones(40, dtype=torch.bool))
                 for _ in range(4)]
    features = precompute_features(runtime, sequences, exit_layer=None)
    heads = build_heads(runtime.config.hidden_size, runtime.config.vocab_size, 3, True).to(dtype=runtime.dtype)
    report = train_heads(runtime, heads, features, torch.arange(runtime.config.vocab_size), candidates=260,
                         minutes=1, max_epochs=15, lr=1e-2, batch_tokens=80)
    assert report.losses[-1] < report.losses[0]
    checkpoints.save(tmp_path / "ours", heads.state_dict(), {"method": "medusa", "recommended": {"tree": "chain_4"}})
    medusa = get("medusa")(runtime, heads=str(tmp_path / "ours"))
    assert medusa.settings["tree"] == "chain_4" and medusa.settings["num_heads"] == 3
    ids = model.tokenizer.encode(PROMPTS[0])
    assert medusa.generate(ids, 20, []).new_ids == get("vanilla")(runtime).generate(ids, 20, []).new_ids


@pytest.mark.slow
@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "chain_4"])
def test_lossless_on_the_embedded_model(embedded, questions_file, tree, tmp_path):
    from methods import checkpoints
    questions = [json.loads(line) for line in questions_file.open()]
    multi = next(q for q in questions if len(q["turns"]) == 2)
    article = next(q for q in questions if q["category"] == "summarization")
    runtime = embedded.runtime
    folder = checkpoints.committed_checkpoint(runtime.alias, "medusa")
    if folder is None:  # untrained heads still exercise tree verification
        torch.manual_seed(0)
        heads = build_heads(runtime.config.hidden_size, runtime.config.vocab_size, 4, True)
        for block in heads:
            torch.nn.init.normal_(block[0].linear.weight, std=0.02)
        folder = tmp_path / "heads"
        checkpoints.save(folder, heads.state_dict(), {"method": "medusa"})
    vanilla, medusa = get("vanilla")(runtime), get("medusa")(runtime, heads=str(folder), tree=tree)
    first = embedded.tokenizer.decode(vanilla.generate(embedded.prompt_ids(multi["turns"][:1], []), 16,
                                                       embedded.stop_ids).new_ids).strip()
    prompts = [embedded.prompt_ids(["What is the capital of France?"], []),
               embedded.prompt_ids(multi["turns"], [first]), embedded.prompt_ids(article["turns"], [])]
    assert len(prompts[-1]) > 512
    outcomes = []
    for ids in prompts:
        expected = vanilla.generate(ids, 24, embedded.stop_ids)
        got = medusa.generate(ids, 24, embedded.stop_ids)
        outcomes.append(assert_lossless(embedded, ids, expected.new_ids, got.new_ids))
    assert outcomes.count("identical") >= 2


def test_a_real_model_without_heads_is_a_missing_checkpoint(monkeypatch):
    from methods import MissingCheckpoint
    model = tiny("tiny-llama-random")
    monkeypatch.setattr(model.runtime, "alias", "someone/their-model")
    with pytest.raises(MissingCheckpoint, match="make train MODEL=someone/their-model METHOD=medusa"):
        get("medusa")(model.runtime)


def test_step_costs_of_a_tree_the_profile_does_not_time_use_a_forward_over_its_nodes():
    """chain_3 (the tuned tree of the embedded model) is not among the profiled trees: its
    verification is costed as a forward over its 4 nodes, interpolated from the profiled ones."""
    from methods import ProfileTable
    rows = [{"component": "forward", "k": k, "context": 128, "ms_min": ms, "ms_median": ms}
            for k, ms in ((1, 10.0), (2, 11.0), (8, 17.0))]
    rows += [{"component": "medusa_draft", "k": 1, "context": 128, "ms_min": 1.5, "ms_median": 1.5},
             {"component": "medusa_verify_chain_2", "k": 3, "context": 128, "ms_min": 12.5, "ms_median": 12.5}]
    medusa = get("medusa")
    profiled = medusa.step_costs(ProfileTable(rows), {"num_heads": 2, "tree": "chain_2"})
    assert (profiled.gamma, profiled.draft_ms, profiled.verify_ms) == (2, 1.5, 12.5)
    unprofiled = medusa.step_costs(ProfileTable(rows), {"num_heads": 3, "tree": "chain_3"})
    assert unprofiled.verify_ms == pytest.approx(ProfileTable(rows).forward(4)) and unprofiled.step_ms == 10.0
    assert medusa.step_costs(ProfileTable(rows), {"num_heads": 3, "tree": "no_such_tree"}) is None
