"""Decoding methods and their registry.

A method is one file in methods/: a class registered under a name, built from the runtime model
and its options, that decodes one prompt at a time with the speculative core (methods/core.py):

    @register("mine")
    class Mine(Method):
        options = {"depth": Option(int, 4, "tokens drafted per step")}
        def generate(self, prompt_ids, max_new_tokens, stop_ids) -> Generation: ...

`Generation.accept_lengths` has one entry per target forward pass: the tokens that pass committed,
the prefill included (it commits 1), so `sum(accept_lengths) == len(new_ids)`.

What else a method may declare, all optional, is read from the registry by `bench/` (README,
"Adding a method"): `default_sweep` (the specs `make bench` runs), `profile` (its step components
for `bench profile`), `step_costs` (draft and verify cost for Leviathan's bound), `train` and
`tuning_grid` (for `bench train` and `bench tune`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from methods.acceptance import GREEDY, rule_for
from methods.runtime import Transformer


class MissingCheckpoint(ValueError):
    """A method has no trained weights for this model: default sweeps skip it, an explicit request fails."""


@dataclass(frozen=True)
class Option:
    type: type  # int, float, str or bool
    default: Any
    help: str

    def parse(self, name: str, text: str) -> Any:
        """A value from its command-line text (booleans are `true`/`false`)."""
        if self.type is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(f"option {name} takes true or false, not {text!r}")
            return text.lower() == "true"
        try:
            return self.type(text)
        except ValueError:
            raise ValueError(f"option {name} takes a {self.type.__name__}, not {text!r}") from None


@dataclass
class Generation:
    new_ids: list[int]
    accept_lengths: list[int]  # per target forward: tokens committed (prefill = 1)
    draft_lengths: list[int] = field(default_factory=list)  # per target forward: drafts proposed to it
    prefill_seconds: float | None = None  # time to the first new token, when the method measures it

    def __post_init__(self):
        if not self.draft_lengths:
            self.draft_lengths = [0] * len(self.accept_lengths)
        if sum(self.accept_lengths) != len(self.new_ids) or len(self.draft_lengths) != len(self.accept_lengths):
            raise AssertionError(f"accept_lengths sum {sum(self.accept_lengths)} != {len(self.new_ids)} new tokens")


@dataclass(frozen=True)
class Sampling:
    """The decoding policy of one generate() call: temperature 0 is greedy; above it tokens are
    sampled from softmax(logits / T) with `generator` (one per question, run and turn)."""
    temperature: float = 0.0
    generator: torch.Generator | None = None


@dataclass
class Overhead:
    trained_params: int = 0  # parameters the method adds and trains
    extra_memory_bytes: int = 0  # memory it holds beyond the target model (weights, caches)


@dataclass
class StepCosts:
    """What one speculative step of a method costs, from a profile (milliseconds, best of runs)."""
    gamma: int  # tokens drafted per step (tree depth for a tree)
    step_ms: float  # a target forward over one token: vanilla's step
    draft_ms: float  # drafting one step's tokens (all of them)
    verify_ms: float  # the target forward that verifies them

    @property
    def cost_ratio(self) -> float:
        """Leviathan's c: the cost of one draft token relative to a target step."""
        return self.draft_ms / self.gamma / self.step_ms

    def leviathan(self, tau: float) -> float:
        """Leviathan's speedup at τ mean accepted tokens: τ / (γc + 1) (verification costs one step)."""
        return tau / (self.gamma * self.cost_ratio + 1.0)

    def measured(self, tau: float) -> float:
        """Speedup at τ with the measured verify cost: τ · step / (draft + verify)."""
        return tau * self.step_ms / (self.draft_ms + self.verify_ms)


class ProfileTable:
    """The rows of a step-cost profile (profile.csv: component, k, context, ms_min, ms_median) as a
    method's `step_costs` hook reads them."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def ms(self, component: str, k: int | None = None, context: str | int = "min") -> float | None:
        """Best time of `component` (at `k` if given) at the smallest ("min") or largest ("max")
        profiled context, or at the given one; None when the profile lacks it."""
        rows = [r for r in self.rows if r["component"] == component and (k is None or r["k"] == k)]
        if not rows:
            return None
        if context in ("min", "max"):
            context = (min if context == "min" else max)(r["context"] for r in rows)
        rows = [r for r in rows if r["context"] == context]
        return rows[0]["ms_min"] if rows else None

    def forward(self, k: int, extrapolate: bool = True) -> float | None:
        """A target forward over k new tokens at the smallest profiled context, interpolated in k;
        outside the profiled k the nearest point, or None with `extrapolate` False."""
        rows = [r for r in self.rows if r["component"] == "forward"]
        if not rows:
            return None
        context = min(r["context"] for r in rows)
        points = {r["k"]: r["ms_min"] for r in rows if r["context"] == context}
        if k in points:
            return points[k]
        ks = sorted(points)
        if not extrapolate and not ks[0] <= k <= ks[-1]:
            return None
        if k <= ks[0] or k >= ks[-1]:
            return points[ks[0] if k <= ks[0] else ks[-1]]
        below, above = max(x for x in ks if x < k), min(x for x in ks if x > k)
        return points[below] + (k - below) / (above - below) * (points[above] - points[below])


class Method:
    """Base class: holds the model and the resolved options, and owns KV caches it grows on demand.

    Hooks read by bench/ (all optional):
    - `default_sweep`: the specs of this method in the default sweep (`make bench`), e.g.
      ("kangaroo", "kangaroo+draft_vocab=32768"); empty: only when named with --methods;
    - `profile(runtime, cache, context, add)`: time the method's own step components for
      `bench profile` by calling add(component, k, function);
    - `step_costs(profile, options)`: the StepCosts of one step at these options, from a profile;
    - `train(job)`: train a checkpoint for `bench train` (methods/train.py's TrainingJob);
    - `tuning_grid`: option variants `bench tune` times on held-out prompts; the fastest becomes
      the checkpoint's recommended defaults, read back through `checkpoint_option`;
    - `variant_tuning_grids`: {boolean option: grid} for variants tuned apart (Kangaroo's
      `tree`): `bench tune --variant NAME` stores the best as `recommended[NAME]`, which the
      checkpoint's defaults take only while that option is on;
    - `selftest_variants`: the option variants the lossless suite (tests, `gpu-check`) runs;
    - `verifies_every_step`: options under which the method verifies several tokens at (nearly)
      every step, so that planted verification bugs must show in its output (None: not checked).
    """
    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    description: ClassVar[str] = ""
    default_sweep: ClassVar[tuple[str, ...]] = ()
    tuning_grid: ClassVar[tuple[dict, ...]] = ()
    variant_tuning_grids: ClassVar[dict[str, tuple[dict, ...]]] = {}
    checkpoint_option: ClassVar[str] = ""
    selftest_variants: ClassVar[tuple[dict, ...]] = ({},)
    verifies_every_step: ClassVar[dict | None] = None

    def __init__(self, model: Transformer, **options: Any):
        self.model = model
        self.settings = resolve_options(type(self), options)
        self._caches: dict[str, Any] = {}

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int],
                 sampling: Sampling | None = None) -> Generation:
        raise NotImplementedError

    def acceptance(self, sampling: Sampling | None):
        """The acceptance rule for this policy (methods/acceptance.py): greedy at temperature 0,
        exact speculative sampling above it (a method with another rule overrides this)."""
        return rule_for(sampling.temperature, sampling.generator) if sampling else GREEDY

    @classmethod
    def acceptance_name(cls, options: dict) -> str:
        """The rule a method at these options samples with: "exact" (lossless) or another name."""
        return "exact"

    def overhead(self) -> Overhead:
        return Overhead()

    def grown_cache(self, name: str, needed: int, num_layers: int | None = None):
        """The KV cache `name`, reallocated (rounded up to 256 slots) only when too small; the old
        one is freed before the larger one is allocated, so the two never coexist."""
        if name not in self._caches or self._caches[name].max_len < needed:
            self._caches.pop(name, None)
            self._caches[name] = self.model.new_cache(-(-needed // 256) * 256, num_layers=num_layers)
        return self._caches[name]

    def cache(self, needed: int):
        """The target model's KV cache, with at least `needed` slots."""
        return self.grown_cache("target", needed)

    @classmethod
    def profile(cls, runtime: Transformer, cache, context: int, add: Callable[[str, int, Callable], None]) -> None:
        """Time this method's own step components (none by default)."""

    @classmethod
    def step_costs(cls, profile: ProfileTable, options: dict) -> StepCosts | None:
        """This method's step costs at `options` (None: it does not draft, or the profile lacks them)."""
        return None

    train: ClassVar[Callable | None] = None


def resolve_options(method: type[Method], given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(method.options))
    if unknown:
        valid = ", ".join(sorted(method.options)) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {method.name}; valid: {valid}")
    resolved = {}
    for key, option in method.options.items():
        value = given.get(key, option.default)
        resolved[key] = option.parse(key, value) if isinstance(value, str) and option.type is not str else value
    return resolved


_REGISTRY: dict[str, type[Method]] = {}
_BUILTIN_MODULES = ("methods.vanilla", "methods.hf_generate", "methods.pld", "methods.kangaroo",
                    "methods.medusa", "methods.eagle")


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a Method available under `name`."""
    def decorate(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available() -> dict[str, type[Method]]:
    _load_builtins()
    return dict(_REGISTRY)


def get(name: str) -> type[Method]:
    methods = available()
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(methods)}")
    return methods[name]


def default_sweep() -> list[str]:
    """The specs of the default sweep, in registration order."""
    return [spec for method in available().values() for spec in method.default_sweep]


def trainable() -> dict[str, type[Method]]:
    """The methods `bench train` can train."""
    return {name: method for name, method in available().items() if method.train is not None}


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Greedy choice over the last dimension (ties go to the lowest id, as torch.argmax)."""
    return logits.argmax(dim=-1)
