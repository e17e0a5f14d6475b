"""The tree module (methods/tree.py) and the speculative core's acceptance (methods/core.py)."""
from __future__ import annotations

import pytest
import torch

from methods import core
from methods.medusa import read_tree
from methods.tree import Tree


def test_tree_from_paths():
    tree = Tree.from_paths(read_tree("mc_sim_7b_63"))
    paths = tree.rank_paths()
    assert tree.size == 64 and tree.top_k == 10 and tree.max_depth == 4 and paths[0] == ()
    assert tree.mask.shape == (64, 64) and bool(tree.mask[:, 0].all()) and bool(tree.mask.diagonal().all())
    node = paths.index((0, 1, 2))
    ancestors = {0, paths.index((0,)), paths.index((0, 1)), node}
    assert set(torch.nonzero(tree.mask[node]).flatten().tolist()) == ancestors
    assert tree.depth[node] == 3 and tree.rank[node] == 2 and paths[int(tree.parents[node])] == (0, 1)
    assert sorted(paths[1:]) == sorted(read_tree("mc_sim_7b_63"))
    assert tree.positions(100)[node] == 103


def test_tree_from_parents_as_a_dynamic_tree_is_built():
    # root -> a, b; a -> c; c -> d (parents before children, as a per-step tree comes)
    tree = Tree.from_parents([-1, 0, 0, 1, 3], rank=[0, 0, 1, 0, 0])
    assert tree.depth.tolist() == [0, 1, 1, 2, 3] and tree.max_depth == 3
    assert sorted(tree.leaf_paths.tolist()) == [[0, 1, 3, 4], [0, 2, -1, -1]]
    assert tree.mask[4].tolist() == [True, True, False, True, True]
    with pytest.raises(ValueError, match="parent before its child"):
        Tree.from_parents([-1, 2, 0])


def test_bad_paths_are_refused():
    with pytest.raises(ValueError, match="lacks its parent"):
        Tree.from_paths([(0,), (1, 0)])


def test_longest_match_picks_the_longest_accepted_branch():
    tree = Tree.from_paths([(0,), (1,), (0, 0), (1, 0), (1, 0, 0)])
    # nodes: 0 root, 1:(0,) 2:(1,) 3:(0,0) 4:(1,0) 5:(1,0,0)
    tokens = torch.tensor([9, 10, 11, 12, 13, 14])
    targets = torch.tensor([11, 0, 13, 0, 99, 0])  # root->11 (node 2), node 2->13 (node 4), node 4->99 (not 14)
    path, accepted = tree.longest_match(tokens, targets)
    assert int(accepted) == 2 and path.tolist()[:3] == [0, 2, 4]
    path, accepted = tree.longest_match(tokens, targets, budget=1)
    assert int(accepted) == 1 and path.tolist()[:2] == [0, 2]
    assert int(tree.longest_match(tokens, torch.tensor([5, 0, 0, 0, 0, 0]))[1]) == 0


def test_greedy_linear_acceptance():
    logits = torch.zeros(4, 10)
    logits[torch.arange(4), torch.tensor([3, 5, 7, 2])] = 1.0  # the target's argmax after each position
    accepted, token = core.GREEDY.linear(logits, torch.tensor([3, 5, 1]))
    assert int(accepted) == 2 and int(token) == 7
    accepted, token = core.GREEDY.linear(logits, torch.tensor([3, 5, 7]))
    assert int(accepted) == 3 and int(token) == 2
    accepted, token = core.GREEDY.linear(logits[:1], torch.empty(0, dtype=torch.long))
    assert int(accepted) == 0 and int(token) == 3


def test_commit_stops_at_a_stop_token_and_advances_the_cache():
    state = core.start([1, 2, 3], 10, [99], "cpu")
    logits = torch.zeros(10)
    logits[4] = 1
    core.commit_first(state, logits)
    assert state.new_ids == [4] and state.length == 3 and state.accept_lengths == [1] and not state.done
    verify = torch.full((3, 100), -1.0)
    verify[0, 5], verify[1, 99], verify[2, 8] = 1, 1, 1  # after 4: 5; after 5: stop; after 99: 8
    assert core.verify_linear(state, verify, torch.tensor([5, 99])) == 2
    assert state.new_ids == [4, 5, 99] and state.accept_lengths == [1, 2] and state.draft_lengths == [0, 2]
    assert state.length == 6 and state.done


def test_chain_acceptance_per_draft_position():
    from methods.train import chain_acceptance
    hits = [torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)]
    # chains from each start: run lengths 2,1,0,3,2,1 -> reach >=1: 5 of 6, >=2: 3 of 5, >=3: 1 of 3
    assert chain_acceptance(hits, 3) == pytest.approx([5 / 6, 3 / 5, 1 / 3])
    assert chain_acceptance([torch.zeros(4, dtype=torch.bool)], 2) == [0.0, 0.0]


def test_train_loop_anneals_within_its_time_budget_and_records_the_curve(monkeypatch):
    """A job cut by its minutes still ends near lr/10 (the cosine follows elapsed time, not the
    planned epochs), and the evaluation runs every eval_minutes and once at the end."""
    from methods import train
    clock = iter(range(100_000))
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock) * 0.3)  # 0.005 min per call
    optimizers = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    monkeypatch.setattr(train.torch.optim, "AdamW", Recorded)
    weight = torch.nn.Parameter(torch.ones(3))
    rates, evaluations = [], []

    def step_loss(i):
        rates.append(optimizers[0].param_groups[0]["lr"])
        return (weight ** 2).sum(), 3

    module = torch.nn.Module()
    module.weight = weight
    report = train.train_loop(module, step_loss, batches=4, minutes=3.0, max_epochs=1000, lr=1.0,
                              evaluate=lambda: evaluations.append(1) or 0.5, eval_minutes=1.0)
    assert 100 < report.steps < 4000  # cut by the budget, far from the planned epochs
    assert rates[-1] == pytest.approx(0.1, abs=0.01) and max(rates) > 0.95
    assert len(report.curve) == len(evaluations) >= 3 and report.curve[-1]["steps"] == report.steps
