"""Tests of `python -m bench profile` (bench/profile.py) on a tiny random model."""
import csv
import json

import pytest
import torch

from bench import profile
from bench.__main__ import main
from bench.metrics import leviathan_bound
from tests.conftest import tiny


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_forward_cost_counts_weights_kv_and_flops():
    runtime = tiny("tiny-llama-random", "float32").runtime
    cfg = runtime.config
    nbytes_1, flops_1 = profile.forward_cost(runtime, 1, 0)
    nbytes_8, flops_8 = profile.forward_cost(runtime, 8, 0)
    linear = sum(m.weight.numel() for m in runtime.layers.modules() if isinstance(m, torch.nn.Linear))
    head = runtime.lm_head.weight.numel()
    assert nbytes_1 == nbytes_8  # no context: the weights only, read once whatever k
    assert nbytes_1 >= 4 * (linear + head)
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # one query over one key
    assert flops_1 == 2 * (linear + head) + attention
    nbytes_ctx, _ = profile.forward_cost(runtime, 1, 100)
    assert nbytes_ctx - nbytes_1 == cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 100 * 4
    # the floor takes the larger of the two limits
    assert profile.floor_ms(runtime, 8, 0, bandwidth=1e9, peak=1e18) == pytest.approx(1000 * nbytes_8 / 1e9)
    assert profile.floor_ms(runtime, 8, 0, bandwidth=1e18, peak=1e9) == pytest.approx(1000 * flops_8 / 1e9)


def test_sliding_layers_see_only_their_window():
    runtime = tiny("tiny-gemma3-random", "float32").runtime
    cfg = runtime.config
    assert "sliding" in cfg.layer_types and cfg.sliding_window
    far = cfg.sliding_window * 4
    bytes_far, _ = profile.forward_cost(runtime, 1, far)
    full_layers = cfg.layer_types.count("full")
    sliding_layers = cfg.layer_types.count("sliding")
    per_key = 2 * cfg.num_kv_heads * cfg.head_dim * 4
    bytes_0, _ = profile.forward_cost(runtime, 1, 0)
    assert bytes_far - bytes_0 == per_key * (full_layers * far + sliding_layers * cfg.sliding_window)


def test_profile_command_writes_csv_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(profile, "K_VALUES", (1, 2, 4))
    monkeypatch.setattr(profile, "CONTEXTS", (16, 32))
    original = profile.profile_rows
    monkeypatch.setattr(profile, "profile_rows",
                        lambda model, **kw: original(model, k_values=(1, 2, 4), contexts=(16, 32), repeats=2,
                                                     stream_bytes=1 << 24))
    threads = torch.get_num_threads()
    try:
        assert main(["profile", "--model", "tiny-llama-random", "--device", "cpu", "--dtype", "float32",
                     "--matmul", "torch", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "profile.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["component", "k", "context", "ms_min", "ms_median"]
        rows = list(reader)
    components = {row["component"] for row in rows}
    assert {"forward", "floor", "lm_head", "stream_read_1gib", "peak_matmul", "kangaroo_draft",
            "kangaroo_draft_vocab32768", "kangaroo_verify", "kangaroo_tree_draft_vocab32768", "kangaroo_tree_verify",
            "medusa_draft", "pld_lookup", "eagle2_draft", "eagle2_verify"} <= components
    assert any(c.startswith("medusa_verify_") for c in components)
    forward = {(int(r["k"]), int(r["context"])) for r in rows if r["component"] == "forward"}
    assert forward == {(k, c) for k in (1, 2, 4) for c in (16, 32)}
    for row in rows:
        assert 0 < float(row["ms_min"]) <= float(row["ms_median"])
    summary = json.loads((tmp_path / "profile.json").read_text())
    assert summary["bandwidth_bytes_per_s"] > 1e8 and summary["peak_flops_per_s"] > 1e8
    assert summary["model"] == "tiny-llama-random"
    assert (tmp_path / "figures" / "profile.png").stat().st_size > 1000
    ratios = profile.floor_ratios(profile.read_profile(tmp_path / "profile.csv"))
    assert set(ratios) == forward and all(ratio > 0 for ratio in ratios.values())


def test_leviathan_bound_from_profiled_costs():
    # draft cost 10% of a step, 5 drafts, 80% acceptance: 3.69 tokens per 1.5 steps
    assert leviathan_bound(0.8, 5, 0.1) == pytest.approx((1 - 0.8 ** 6) / 0.2 / 1.5)


def _rows(component, points, context=128):
    return [{"component": component, "k": k, "context": context, "ms_min": ms, "ms_median": ms} for k, ms in points]


def test_step_costs_per_method():
    from bench.metrics import step_costs
    rows = (_rows("forward", [(1, 40.0), (4, 50.0), (8, 60.0)]) + _rows("forward", [(1, 99.0)], context=1024)
            + _rows("kangaroo_draft", [(1, 30.0)]) + _rows("kangaroo_draft_vocab32768", [(1, 8.0)])
            + _rows("medusa_draft", [(1, 2.0)]) + _rows("medusa_verify_small_7", [(7, 55.0)])
            + _rows("pld_lookup", [(1, 0.1)]) + _rows("pld_lookup", [(1, 0.4)], context=1024))
    full = step_costs(rows, "kangaroo", {"steps": 6, "draft_vocab": 0})
    assert (full.gamma, full.step_ms, full.draft_ms) == (6, 40.0, 180.0)
    assert full.verify_ms == pytest.approx(57.5)  # k = 7 between 4 and 8
    assert full.cost_ratio == pytest.approx(0.75)
    assert full.leviathan(2.0) == pytest.approx(2.0 / 5.5)
    assert full.measured(2.0) == pytest.approx(2 * 40 / (180 + 57.5))
    small = step_costs(rows, "kangaroo", {"steps": 6, "draft_vocab": 32768})
    assert small.draft_ms == 48.0
    medusa = step_costs(rows, "medusa", {"num_heads": 4, "tree": "small_7"})
    assert (medusa.gamma, medusa.draft_ms, medusa.verify_ms) == (4, 2.0, 55.0)
    pld = step_costs(rows, "pld", {"num_draft": 10})
    assert pld.draft_ms == 0.4 and pld.verify_ms == 60.0  # beyond the largest k: the last point
    assert step_costs(rows, "vanilla", {}) is None
    assert step_costs(rows, "medusa", {"num_heads": 4, "tree": "mc_sim_7b_63"}) is None  # 64 nodes: not profiled
    assert step_costs(rows, "medusa", {"num_heads": 3, "tree": "chain_3"}).verify_ms == pytest.approx(50.0)
    trees = (_rows("kangaroo_tree_draft_vocab32768", [(4, 12.0)]) + _rows("kangaroo_tree_verify", [(16, 70.0)])
             + _rows("eagle2_draft", [(1, 3.0), (4, 5.0)]) + _rows("eagle2_verify", [(16, 66.0)]))
    tree = step_costs(rows + trees, "kangaroo", {"steps": 6, "draft_vocab": 32768, "tree": True, "top_k": 4,
                                                "total_tokens": 16})
    assert (tree.gamma, tree.draft_ms, tree.verify_ms) == (6, 8.0 + 5 * 12.0, 70.0)
    eagle = step_costs(rows + trees, "eagle2", {"depth": 4, "top_k": 4, "total_tokens": 16})
    assert (eagle.gamma, eagle.draft_ms, eagle.verify_ms) == (4, 2 * 3.0 + 3 * 5.0, 66.0)
    assert step_costs(rows + trees, "eagle2", {"depth": 4, "top_k": 10, "total_tokens": 60}) is None


def test_method_components_are_timed_against_an_interleaved_step(monkeypatch):
    """The host slows down 3x between the forward rows and the methods' rows: a component that
    costs what a one-token forward costs is still recorded at the forward rows' one-token time,
    since it is timed as a ratio to a one-token forward right before it."""
    from bench.profile import methods as registry
    phase = {"slow": False}
    monkeypatch.setattr(profile, "once", lambda function, device: 3.0 if phase["slow"] else 1.0)
    available = registry.available

    def later():
        phase["slow"] = True
        return available()
    monkeypatch.setattr(registry, "available", later)
    rows, _ = profile.profile_rows(tiny("tiny-llama-random", "float32"), k_values=(1, 2), contexts=(16,),
                                   repeats=2, stream_bytes=1 << 20)
    step = next(r["ms_min"] for r in rows if r["component"] == "forward" and r["k"] == 1)
    components = [r for r in rows if r["component"].startswith(("kangaroo_", "medusa_", "eagle2_", "pld_"))]
    assert step == 1.0 and len(components) >= 5
    assert all(r["ms_min"] == r["ms_median"] == step for r in components), components
