"""`bench distill-data`: the model's own greedy answers, batched, resumable, never a Spec-Bench question."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

import methods
from bench import data, distill
from bench.errors import UserError
from bench.__main__ import main
from tests.conftest import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ngram_exclusion():
    benchmark = distill.ngrams("Write a persuasive email to convince your introverted friend, who dislikes public speaking")
    assert distill.overlaps_benchmark("Please: write a PERSUASIVE email to convince your introverted friend!", benchmark)
    assert not distill.overlaps_benchmark("write a persuasive email to convince your friend", benchmark)


def test_split_is_a_stable_five_percent():
    splits = [data.split_of(str(i)) for i in range(4000)]
    assert 0.03 < splits.count("held_out") / len(splits) < 0.07
    assert data.split_of("abc") == data.split_of("abc")


@pytest.fixture
def conversations(questions_file, monkeypatch):
    """Fake ShareGPT: prompts of a few equal lengths, one copying a Spec-Bench question."""
    spec_bench = json.loads(questions_file.open().readline())["turns"][0]
    fake = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Tell me about item {i:02d}"},
                                               {"from": "gpt", "value": "..."}]} for i in range(7)]
    fake.insert(2, {"id": "copied", "conversations": [{"from": "human", "value": "Hi. " + spec_bench}]})
    fake.insert(4, {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hello"}]})
    monkeypatch.setattr(data, "iter_sharegpt", lambda *args, **kwargs: iter(fake))
    return fake


def test_batched_answers_are_vanillas_and_the_job_resumes(conversations, questions_file, tmp_path):
    model = tiny("tiny-llama-random")  # float64: a batched row computes what a one-row decode does
    out = tmp_path / "distill"
    first = distill.distill(model, out, 4, 12, None, questions_file, batch=3)
    assert first["conversations"] == 4 and first["excluded_ids"] == ["copied"]
    second = distill.distill(model, out, 7, 12, None, questions_file, batch=3)
    assert second["conversations"] == 7 and len(second["jobs"]) == 2
    with gzip.open(out / "answers.jsonl.gz", "rt") as handle:
        records = [json.loads(line) for line in handle]
    assert sorted(r["id"] for r in records) == [f"c{i}" for i in range(7)]
    vanilla = methods.get("vanilla")(model.runtime)
    for record in records:
        expected = vanilla.generate(record["prompt_ids"], 12, model.stop_ids).new_ids
        assert record["answer_ids"] == expected
        assert record["stopped"] == (expected[-1] in model.stop_ids)
        assert record["split"] == data.split_of(record["id"])


def test_a_cut_off_batch_is_dropped_and_rerun(conversations, questions_file, tmp_path):
    model = tiny("tiny-llama-random")
    out = tmp_path / "distill"
    distill.distill(model, out, 3, 6, None, questions_file, batch=3)
    path = out / "answers.jsonl.gz"
    path.write_bytes(path.read_bytes() + gzip.compress(b'{"id": "c9", "prompt')[:-6])  # a batch cut off mid-write
    assert len(distill.read_answers(path)) == 3
    assert distill.distill(model, out, 5, 6, None, questions_file, batch=3)["conversations"] == 5


def test_other_settings_in_the_same_folder_are_refused(conversations, questions_file, tmp_path, capsys):
    out = tmp_path / "distill"
    args = ["distill-data", "--model", "tiny-llama-random", "--out", str(out), "--conversations", "2",
            "--questions", str(questions_file), "--device", "cpu", "--matmul", "torch"]
    assert main(args + ["--max-new-tokens", "4"]) == 0
    assert main(args + ["--max-new-tokens", "5"]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("method, options", [("kangaroo", ["exit_layer=1"]), ("medusa", ["num_heads=2"]),
                                             ("eagle2", ["token_weight=0.1"])])
def test_train_on_distilled_answers_through_the_method_hook(method, options, tmp_path, monkeypatch):
    """`bench train --data DIR`: the method's own `train` hook on the model's answers, a loadable checkpoint."""
    from bench import training
    monkeypatch.setattr(training, "token_ranking", lambda model: torch.arange(model.runtime.config.vocab_size))
    model = tiny("tiny-llama-random")
    generator = torch.Generator().manual_seed(0)
    records = [{"id": str(i), "split": "held_out" if i % 5 == 0 else "train",
                "prompt_ids": [1] + torch.randint(4, 200, (12,), generator=generator).tolist(),
                "answer_ids": torch.randint(4, 200, (20,), generator=generator).tolist(), "stopped": False}
               for i in range(10)]
    folder = tmp_path / "data"
    folder.mkdir()
    distill.append_answers(folder / distill.ANSWERS, records)
    out = tmp_path / "ckpt"
    assert main(["train", "--model", "tiny-llama-random", "--method", method, "--data", str(folder), "--out", str(out),
                 "--minutes", "0.2", "--epochs", "1", "--candidates", "64", "--no-tune", "--dtype", "float64",
                 "--device", "cpu", "--set", *options]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["tokens"] == 8 * 20 and "distill-data" in config["provenance"]["data"]
    assert config["provenance"]["held_out"]
    curve = config["provenance"]["history"][-1]["curve"]  # the held-out figure at the end of the job
    assert len(curve) == 1 and curve[0]["steps"] == config["provenance"]["history"][-1]["steps"]
    assert 0.0 <= curve[0]["held_out"] <= 1.0
    loaded = methods.get(method)(model.runtime, **{methods.get(method).checkpoint_option: str(out)})
    ids = records[0]["prompt_ids"]
    assert loaded.generate(ids, 12, []).new_ids == methods.get("vanilla")(model.runtime).generate(ids, 12, []).new_ids


def test_unknown_training_option_lists_the_valid_ones(capsys):
    assert main(["train", "--model", "tiny-llama-random", "--method", "kangaroo", "--set", "depth=3"]) == 2
    assert "exit_layer" in capsys.readouterr().err


@pytest.mark.slow
def test_the_committed_answers_hold_no_spec_bench_question(embedded, questions_file):
    """data/distill/gemma-3-270m: every prompt, decoded, shares no normalised 8-word n-gram with any
    Spec-Bench turn, and none of the recorded exclusions slipped in."""
    from pathlib import Path
    folder = Path(__file__).resolve().parents[1] / "data" / "distill" / "gemma-3-270m"
    records = distill.read_answers(folder / distill.ANSWERS)
    provenance = json.loads((folder / distill.PROVENANCE).read_text())
    assert len(records) == provenance["conversations"] > 1000
    assert provenance["settings"]["model"] == "gemma-3-270m" and provenance["excluded_ids"]
    benchmark = distill.benchmark_ngrams(questions_file)
    assert not {r["id"] for r in records} & set(provenance["excluded_ids"])
    overlapping = [r["id"] for r in records
                   if distill.overlaps_benchmark(embedded.tokenizer.decode(r["prompt_ids"]), benchmark)]
    assert overlapping == []
    assert sum(len(r["answer_ids"]) for r in records) == provenance["tokens"]


def test_tune_pairs_every_variant_with_a_vanilla_run_and_keeps_the_best_speedup(tmp_path, monkeypatch):
    from bench import training
    from methods import checkpoints
    from methods.kangaroo import random_adapter
    model = tiny("tiny-llama-random")
    checkpoints.save(tmp_path / "ckpt", random_adapter(model.runtime).state_dict(),
                     {"method": "kangaroo", "options": {"exit_layer": 2}, "provenance": {}})
    monkeypatch.setattr(training, "held_out_prompts", lambda model, count: [[1, 5, 6, 7], [1, 9, 10]])
    monkeypatch.setattr(methods.get("kangaroo"), "tuning_grid", ({"threshold": 0.0, "steps": 2},
                                                                  {"threshold": 0.9, "steps": 4}))
    try:
        config = training.tune(model, "kangaroo", tmp_path / "ckpt", max_new_tokens=6)
    finally:
        model.runtime.set_matmul("torch")
    rows = config["provenance"]["tuning"]["results"]
    assert len(rows) == 2 and all(row["vanilla_tokens_per_s"] > 0 for row in rows)
    assert all(abs(row["speedup"] - row["tokens_per_s"] / row["vanilla_tokens_per_s"]) < 0.01 for row in rows)
    best = max(rows, key=lambda row: row["speedup"])["options"]
    assert {k: config["recommended"][k] for k in best} == best
    # a variant tuned apart: its grid runs with the option on, its best lands under its name only
    monkeypatch.setattr(methods.get("kangaroo"), "variant_tuning_grids",
                        {"tree": ({"threshold": 0.0, "steps": 2, "top_k": 2, "total_tokens": 3},
                                  {"threshold": 0.0, "steps": 3, "top_k": 3, "total_tokens": 6})})
    try:
        tuned = training.tune(model, "kangaroo", tmp_path / "ckpt", max_new_tokens=6, variant="tree")
    finally:
        model.runtime.set_matmul("torch")
    tree_rows = tuned["provenance"]["tuning_tree"]["results"]
    # (top_k without tree=true raises, so these rows ran with the option on)
    assert len(tree_rows) == 2 and tuned["provenance"]["tuning_tree"]["fixed"] == {"tree": True}
    assert tuned["recommended"]["tree"] == max(tree_rows, key=lambda row: row["speedup"])["options"]
    assert {k: tuned["recommended"][k] for k in best} == best  # the chain's defaults untouched
    with pytest.raises(UserError, match="variant"):
        training.tune(model, "kangaroo", tmp_path / "ckpt", variant="nope")
