"""Lossless speculative sampling (methods/acceptance.py, DESIGN.md §4): exact tests of the rules by
enumerating their branches, and chi-square tests of every method's sampled output against the
target's exact distribution, with the power of the test against planted bugs."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import methods
from bench.models import runtime_from_hf
from bench.tiny import tiny_hf_config
from methods import Sampling, acceptance
from methods.acceptance import one_hot

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 6


def random_distributions(seed: int, count: int = 2, size: int = VOCAB) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.softmax(3 * torch.randn(size, generator=generator, dtype=torch.float64), dim=0)
            for _ in range(count)]


# ---- exact: enumerate each rule's branches ---------------------------------------------------------
def ratio_rule_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The token a draft from q leaves: x ~ q, accepted with ratio_accept, else the residual."""
    out = torch.zeros_like(p)
    rest = acceptance.residual(p, q)
    for x in range(p.numel()):
        accept = float(acceptance.ratio_accept(p, q, torch.tensor(x)))
        out[x] += q[x] * accept
        out += q[x] * (1 - accept) * rest
    return out


def multi_round_distribution(p: torch.Tensor, siblings: list[int]) -> torch.Tensor:
    """The token a node with deterministic children `siblings` (rank order) leaves: each tried on
    the residual the rejected ones left; when all fail, the final residual."""
    out, rest, reach = torch.zeros_like(p), p.clone(), 1.0
    for x in siblings:
        x = torch.tensor(x)
        accept = float(acceptance.ratio_accept(rest, one_hot(x, p.numel()), x))
        out[x] += reach * accept
        reach *= 1 - accept
        rest = acceptance.residual(rest, one_hot(x, p.numel()))
    return out + reach * rest


def typical_distribution(p: torch.Tensor, siblings: list[int]) -> torch.Tensor:
    """Medusa's typical acceptance for one node: the first child over the threshold, else from p."""
    rule = acceptance.Typical(1.0)
    out, ok = torch.zeros_like(p), [bool(rule._typical(p, torch.tensor(x))) for x in siblings]
    for x, accepted in zip(siblings, ok):
        if accepted:
            out[x] += 1.0
            return out
    return out + p


@pytest.mark.parametrize("seed", range(20))
def test_the_ratio_rule_leaves_p_exactly(seed):
    p, q = random_distributions(seed)
    assert torch.allclose(ratio_rule_distribution(p, q), p, atol=1e-9, rtol=0)


@pytest.mark.parametrize("seed", range(20))
def test_the_multi_round_rule_leaves_p_exactly_for_any_sibling_set(seed):
    (p,) = random_distributions(seed, 1)
    generator = torch.Generator().manual_seed(100 + seed)
    for count in range(1, VOCAB + 1):
        siblings = torch.randperm(VOCAB, generator=generator)[:count].tolist()
        assert torch.allclose(multi_round_distribution(p, siblings), p, atol=1e-9, rtol=0)


def no_ratio_test(p, q, x):
    return torch.ones_like(p.gather(-1, x.unsqueeze(-1)).squeeze(-1))


def no_residual(p, q):
    return p


@pytest.mark.parametrize("bug, patch", [("drafts accepted without the ratio test", ("ratio_accept", no_ratio_test)),
                                        ("no residual resampling", ("residual", no_residual))])
def test_planted_bugs_break_the_exact_enumeration(bug, patch, monkeypatch):
    monkeypatch.setattr(acceptance, *patch)
    ratio_errors = [float((ratio_rule_distribution(*random_distributions(s)) - random_distributions(s)[0]).abs().max())
                    for s in range(20)]
    round_errors = [float((multi_round_distribution(random_distributions(s, 1)[0], [0, 1]) -
                           random_distributions(s, 1)[0]).abs().max()) for s in range(20)]
    assert min(ratio_errors) > 1e-3 and min(round_errors) > 1e-3, (bug, ratio_errors, round_errors)


def test_typical_acceptance_is_not_exact():
    errors = []
    for seed in range(20):
        (p,) = random_distributions(seed, 1)
        errors.append(float((typical_distribution(p, [0, 1, 2]) - p).abs().max()))
    assert max(errors) > 0.05 and sum(e > 1e-3 for e in errors) >= 15


def test_the_device_rules_use_the_enumerated_primitives(monkeypatch):
    """Exact.linear and Exact.tree call ratio_accept and residual (so the enumeration above covers
    them): with the ratio test removed, every draft is accepted."""
    monkeypatch.setattr(acceptance, "ratio_accept", no_ratio_test)
    rule = acceptance.Exact(1.0, torch.Generator().manual_seed(0))
    logits = torch.zeros(4, VOCAB)
    accepted, _ = rule.linear(logits, torch.tensor([1, 2, 3]))
    assert int(accepted) == 3


# ---- end to end: chi-square against the exact distribution of the first two tokens ------------------
def sampling_model(family: str):
    """A test-only tiny model with an 8-token vocabulary (random weights, float64)."""
    config = tiny_hf_config(family)
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = 8, 1, 2, 0
    from transformers import AutoModelForCausalLM
    torch.manual_seed(5)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    runtime = runtime_from_hf(hf_model)
    with torch.no_grad():  # logits scaled so that the top token takes 20-40% (8 tokens): drafts are often
        weight = runtime.norm.weight  # accepted and often rejected, where a wrong rule shows
        weight.copy_((1 + weight) * 0.3 - 1 if runtime.norm.plus_one else weight * 0.3)
    return runtime


@torch.inference_mode()
def exact_first_two(runtime, prompt: list[int], temperature: float) -> torch.Tensor:
    """p(t1, t2) [V, V] enumerated from vanilla's logits."""
    vocab = runtime.config.vocab_size
    cache = runtime.new_cache(len(prompt) + 2, batch=vocab)
    first = torch.softmax(runtime.forward(torch.tensor([prompt]), runtime.new_cache(len(prompt)), 0)[0, -1] / temperature,
                          dim=-1)
    rows = torch.cat([torch.tensor([prompt] * vocab), torch.arange(vocab)[:, None]], dim=1)  # [V, P + 1]
    second = torch.softmax(runtime.forward(rows, cache, 0)[:, -1] / temperature, dim=-1)  # [V, V]
    return first[:, None] * second


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value); cells expected below 5 are pooled into one."""
    counts, expected = counts.flatten().double(), expected.flatten().double()
    small = expected < 5
    counts = torch.cat((counts[~small], counts[small].sum().view(1)))
    expected = torch.cat((expected[~small], expected[small].sum().view(1)))
    keep = expected > 0
    statistic = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(statistic / 2, dtype=torch.float64)))
    return statistic, df, p_value


def power(statistic: float, df: int, alpha: float = 1e-3) -> float:
    """Power of the test at the planted bug's estimated noncentrality (λ ≈ statistic − df), by the
    normal approximation of the noncentral chi-square."""
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty, alpha 1e-3
    noncentrality = max(statistic - df, 0.0)
    mean, deviation = df + noncentrality, math.sqrt(2 * (df + 2 * noncentrality))
    return 0.5 * math.erfc((critical - mean) / deviation / math.sqrt(2))


SAMPLES = 1200
PROMPT = [1, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]  # every token recurs: prompt lookup always drafts
VARIANTS = [("vanilla", {}), ("hf-generate", {}), ("pld", {}), ("kangaroo", {"threshold": 0.0, "steps": 2}),
            ("medusa", {"tree": "small_7"}), ("eagle2", {"depth": 2, "top_k": 2, "total_tokens": 5}),
            ("kangaroo", {"tree": True, "threshold": 0.0, "steps": 2, "top_k": 2, "total_tokens": 5})]


def sample_first_two(runtime, name: str, options: dict, temperature: float, samples: int = SAMPLES) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained drafters on the test model
        method = methods.get(name)(runtime, **options)
    counts = torch.zeros(8, 8)
    drafted = 0
    for seed in range(samples):
        # three new tokens: the second is then the first verification's (an accepted draft or the rule's own)
        generation = method.generate(PROMPT, 3, [], sampling=Sampling(temperature, torch.Generator().manual_seed(seed)))
        first, second = generation.new_ids[:2]
        counts[first, second] += 1
        drafted += generation.draft_lengths[1]
    assert name in ("vanilla", "hf-generate") or drafted > samples / 2, f"{name} drafted too little to be tested"
    return counts


@pytest.fixture(scope="module")
def runtime():
    return sampling_model("llama")


@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize("name, options", VARIANTS, ids=[n + ("+tree" if o.get("tree") else "") for n, o in VARIANTS])
def test_every_method_samples_the_target_distribution(runtime, name, options, temperature):
    expected = exact_first_two(runtime, PROMPT, temperature) * SAMPLES
    statistic, df, p_value = chi_square(sample_first_two(runtime, name, options, temperature), expected)
    print(f"{name} at T={temperature}: chi-square {statistic:.1f} on {df} df, p {p_value:.3f}")
    assert p_value > 1e-3, (name, temperature, statistic, df, p_value)


@pytest.mark.parametrize("bug", ["no ratio test", "no residual", "typical"])
def test_planted_bugs_fail_the_chi_square_test(runtime, bug, monkeypatch):
    name, options = ("medusa", {"tree": "small_7", "accept": "typical"}) if bug == "typical" else \
        ("kangaroo", {"threshold": 0.0, "steps": 2})
    if bug == "no ratio test":
        monkeypatch.setattr(acceptance, "ratio_accept", no_ratio_test)
    elif bug == "no residual":
        monkeypatch.setattr(acceptance, "residual", no_residual)
    expected = exact_first_two(runtime, PROMPT, 1.0) * SAMPLES
    statistic, df, p_value = chi_square(sample_first_two(runtime, name, options, 1.0), expected)
    print(f"planted bug {bug!r}: chi-square {statistic:.1f} on {df} df, p {p_value:.2e}, power {power(statistic, df):.3f}")
    assert p_value < 1e-3 and power(statistic, df) > 0.99, (bug, statistic, df, p_value)


@pytest.fixture(scope="module")
def softcapped():
    """The sampling model with a final-logit soft cap (Gemma 2's kind), tight enough to reshape p."""
    model = sampling_model("llama")
    model.config.final_logit_softcapping = 1.0
    return model


@pytest.mark.parametrize("name, options", VARIANTS[2:], ids=[n + ("+tree" if o.get("tree") else "") for n, o in VARIANTS[2:]])
def test_speculative_methods_sample_softcapped_logits(softcapped, name, options):
    """Every method scores the target with the soft cap it decodes with (model.head_logits):
    verifying against the uncapped LM head samples a sharper distribution than vanilla's."""
    expected = exact_first_two(softcapped, PROMPT, 1.0) * SAMPLES
    statistic, df, p_value = chi_square(sample_first_two(softcapped, name, options, 1.0), expected)
    print(f"{name} with a soft cap: chi-square {statistic:.1f} on {df} df, p {p_value:.3f}")
    assert p_value > 1e-3, (name, statistic, df, p_value)
