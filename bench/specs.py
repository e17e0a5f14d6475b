"""Method specs (`NAME+key=value+...`), labels, file names and `--method-args` defaults (DESIGN.md §5)."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

import methods
from bench.errors import UserError


@dataclass
class MethodSpec:
    name: str
    options: dict[str, str] = field(default_factory=dict)  # the spec's own keys: they enter the label

    @property
    def label(self) -> str:
        return "+".join([self.name] + [f"{k}={self.options[k]}" for k in sorted(self.options)])

    @property
    def file_name(self) -> str:
        return label_file_name(self.label)


def label_file_name(label: str) -> str:
    """The label with every character outside A-Za-z0-9+=._- percent-encoded."""
    return quote(label, safe="+=._-")


def parse_method_specs(text: str) -> list[MethodSpec]:
    """'vanilla,kangaroo+draft_vocab=32768' -> specs, checked against the registry."""
    registry = methods.available()
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, *pairs = item.split("+")
        if name not in registry:
            raise UserError(f"unknown method {name!r}; valid: {', '.join(registry)}")
        options = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise UserError(f"method spec {item!r}: expected NAME+key=value, got {pair!r}")
            options[key] = value
        check_option_names(name, options)
        specs.append(MethodSpec(name, options))
    if not specs:
        raise UserError("--methods is empty; give a comma-separated list such as vanilla,pld")
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"method spec(s) listed twice: {', '.join(duplicates)}")
    return specs


def parse_method_args(items: list[str] | None) -> dict[str, dict[str, str]]:
    """['kangaroo:adapter=PATH,threshold=0.6'] -> {'kangaroo': {'adapter': 'PATH', 'threshold': '0.6'}}"""
    registry = methods.available()
    defaults: dict[str, dict[str, str]] = {}
    for item in items or []:
        name, sep, rest = item.partition(":")
        if not sep:
            raise UserError(f"--method-args {item!r}: expected NAME:key=value,key=value")
        if name not in registry:
            raise UserError(f"--method-args: unknown method {name!r}; valid: {', '.join(registry)}")
        for pair in filter(None, rest.split(",")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise UserError(f"--method-args {item!r}: expected key=value, got {pair!r}")
            defaults.setdefault(name, {})[key] = value
        check_option_names(name, defaults.get(name, {}))
    return defaults


def check_option_names(name: str, options: dict[str, str]) -> None:
    method = methods.get(name)
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        valid = ", ".join(sorted(method.options)) or "none"
        raise UserError(f"unknown option(s) {', '.join(unknown)} for method {name}; valid: {valid}")


def resolve(spec: MethodSpec, defaults: dict[str, dict[str, str]]) -> dict:
    """Fully resolved options: the method's defaults < --method-args < the spec's own keys."""
    given = {**defaults.get(spec.name, {}), **spec.options}
    try:
        return methods.resolve_options(methods.get(spec.name), given)
    except ValueError as error:
        raise UserError(str(error)) from None

