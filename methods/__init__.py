"""Decoding methods and their registry.

A method is a class registered under a name. It is built from the runtime model and its options and
decodes one prompt at a time:

    @register("mine")
    class Mine(Method):
        options = {"depth": Option(int, 4, "tokens drafted per step")}
        def generate(self, prompt_ids, max_new_tokens, stop_ids) -> Generation: ...

`Generation.accept_lengths` has one entry per target forward pass: the tokens that pass committed,
the prefill included (it commits 1), so `sum(accept_lengths) == len(new_ids)`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

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


@dataclass
class Overhead:
    trained_params: int = 0  # parameters the method adds and trains
    extra_memory_bytes: int = 0  # memory it holds beyond the target model (weights, caches)


class Method:
    """Base class: holds the model and the resolved options, and owns a KV cache it grows on demand."""
    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    description: ClassVar[str] = ""

    def __init__(self, model: Transformer, **options: Any):
        self.model = model
        self.settings = resolve_options(type(self), options)
        self._cache = None

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> Generation:
        raise NotImplementedError

    def overhead(self) -> Overhead:
        return Overhead()

    def cache(self, needed: int):
        """The method's KV cache, reallocated (rounded up to 256 slots) only when too small."""
        if self._cache is None or self._cache.max_len < needed:
            self._cache = None  # freed before the larger one is allocated: never both at once
            self._cache = self.model.new_cache(-(-needed // 256) * 256)
        return self._cache


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
                    "methods.medusa")


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


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Greedy choice over the last dimension (ties go to the lowest id, as torch.argmax)."""
    return logits.argmax(dim=-1)
