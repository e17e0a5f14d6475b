"""The speculative core (methods/core.py): one host read per target forward, and a method defined
here, in the test, gets a lossless run, a report row and a profile row with no edit elsewhere."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import methods
from methods import Generation, Method, Option, ProfileTable, StepCosts, core
from tests.conftest import PROMPTS, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reads(monkeypatch):
    """Counts of the core's read-backs by purpose ("verify", "draft")."""
    counts: Counter = Counter()
    read_back = core.read_back

    def counting(tensor, purpose="verify"):
        counts[purpose] += 1
        return read_back(tensor, purpose)

    monkeypatch.setattr(core, "read_back", counting)
    return counts


@pytest.mark.parametrize("name, options", [("vanilla", {}), ("pld", {}), ("medusa", {}),
                                           ("kangaroo", {"threshold": 0.0, "steps": 3})])
def test_one_host_read_per_target_forward(reads, name, options):
    model = tiny("tiny-llama-random")
    method = methods.get(name)(model.runtime, **options)
    ids = model.tokenizer.encode(PROMPTS[1])
    generation = method.generate(ids, 24, [])
    assert reads["verify"] == len(generation.accept_lengths)  # the prefill's read included
    # Kangaroo's confidence exit reads each draft's probability, apart (at threshold 0 none exits early)
    assert reads["draft"] == (sum(generation.draft_lengths) if name == "kangaroo" else 0)
    assert name != "kangaroo" or reads["draft"] > 2 * len(generation.accept_lengths)


class RepeatLast(Method):
    """Drafts the last token again, `copies` times: right whenever the text repeats a token."""
    description = "drafts the last committed token again (a test method)"
    options = {"copies": Option(int, 2, "drafts per step")}

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens, stop_ids) -> Generation:
        model = self.model
        state = core.start(prompt_ids, max_new_tokens, stop_ids, model.device)
        cache = self.cache(len(prompt_ids) + max_new_tokens + self.settings["copies"] + 1)
        logits = model.forward(core.prompt_tensor(prompt_ids, model.device), cache, 0, last_only=True)
        core.commit_first(state, logits[0, -1])
        while not state.done:
            drafts = state.pending.view(1).repeat(min(self.settings["copies"], state.budget))
            logits = model.forward(core.with_pending(state, drafts), cache, state.length)
            core.verify_linear(state, logits[0], drafts)
        return state.result()

    @classmethod
    def profile(cls, runtime, cache, context, add):
        token = torch.ones(1, 1, dtype=torch.long, device=runtime.device)
        add("repeat_last_draft", 1, lambda: token.repeat(1, 2))

    @classmethod
    def step_costs(cls, profile: ProfileTable, options: dict) -> StepCosts | None:
        copies, draft = options["copies"], profile.ms("repeat_last_draft")
        return StepCosts(copies, profile.forward(1), draft, profile.forward(copies + 1)) if draft else None


@pytest.fixture
def repeat_last():
    methods.register("repeat-last")(RepeatLast)
    yield RepeatLast
    methods._REGISTRY.pop("repeat-last", None)


def test_a_method_defined_here_runs_reports_and_profiles(repeat_last, questions_file, tmp_path):
    from bench import metrics, profile, report, runner
    from bench.runner import RunSettings
    from bench.selftest import lossless_suite
    model = tiny("tiny-gemma3-random")
    # lossless, with drafts that are accepted (the random model's greedy text repeats tokens)
    suite = lossless_suite(model.runtime, [model.tokenizer.encode(p) for p in PROMPTS], 32, labels=["repeat-last"])
    assert suite.verdicts["repeat-last"] == ["identical"] * len(PROMPTS)
    generation = RepeatLast(model.runtime).generate(model.tokenizer.encode(PROMPTS[0]), 32, [])
    assert max(generation.accept_lengths) > 1
    # a run and its report
    out = runner.run(RunSettings(model="tiny-gemma3-random", methods="vanilla,repeat-last+copies=3", categories="qa",
                                 limit=1, max_new_tokens=16, questions=str(questions_file), out=str(tmp_path / "run"),
                                 device="cpu", dtype="float64", matmul="torch"))
    profile.write_profile(model, out, k_values=(1, 2, 4), contexts=(16,), repeats=1, stream_bytes=1 << 22)
    report.write_report(out)
    rows = {(r["method"], r["category"]): r for r in metrics.summarize(metrics.load_run(out)).to_dict("records")}
    assert rows["repeat-last+copies=3", "overall"]["lossless"] == 1.0
    assert "repeat-last+copies=3" in (out / "summary.md").read_text()
    profiled = profile.read_profile(out / "profile.csv")
    assert any(r["component"] == "repeat_last_draft" for r in profiled)
    options = json.loads((out / "config.json").read_text())["methods"]["repeat-last+copies=3"]["effective_options"]
    costs = metrics.step_costs(profiled, "repeat-last", options)
    assert costs.gamma == 3 and costs.verify_ms == ProfileTable(profiled).forward(4)
    # summary.md's step-cost section: the bounds at the run's τ, from the same profile rows
    tau = rows["repeat-last+copies=3", "overall"]["mean_accepted_tokens"]
    lines = (out / "summary.md").read_text().splitlines()
    assert "## Where the time goes" in lines
    choices = [c for r in metrics.load_run(out).answers["repeat-last+copies=3"] for c in r["choices"]]
    drafted = sum(map(sum, (c["draft_lengths"] for c in choices))) / sum(len(c["accept_lengths"]) for c in choices)
    row = next(line for line in lines if line.startswith(f"| repeat-last+copies=3 | 3 | {drafted:.2f} |"))
    assert f"| {costs.leviathan(tau):.2f}× | {costs.measured(tau):.2f}× |" in row
    assert (out / "figures" / "speedup_vs_tau.png").is_file()
