"""The base of methods with trained draft modules (Kangaroo's adapter, Medusa's heads, ...).

It finds the checkpoint (the method's path option, then an environment variable, then the one
committed for the model, then a published one the method knows how to fetch), records its hashes
and recommended defaults, falls back to seeded random drafters on the tiny test models only,
builds the draft-vocabulary head, keeps the method's extra KV caches (grown on demand, the old one
freed first) and reports the overhead of everything it holds.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from methods import Method, MissingCheckpoint, Overhead, checkpoints
from methods.products import Linear, module_bytes, set_matmul_path
from methods.runtime import Transformer


def random_fallback_allowed(model: Transformer) -> bool:
    """Untrained (seeded random) drafters are for the tiny test models only; a real model
    without a checkpoint is skipped by default sweeps and an error when asked for by name."""
    return model.alias is None or model.alias.startswith("tiny-")


def draft_head(model: Transformer, ranking: torch.Tensor | None, size: int) -> tuple[Linear, torch.Tensor | None]:
    """The LM head restricted to the `size` most frequent tokens (a copy of those rows), or the
    model's own head when size is 0 or covers the vocabulary. Returns (head, token ids or None)."""
    if size <= 0 or size >= model.config.vocab_size:
        return model.lm_head, None
    if ranking is None:
        raise ValueError("draft_vocab needs a token frequency ranking; none is available for this model")
    ids = ranking[:size].to(model.device)
    head = Linear(model.config.hidden_size, size, bias=False, device="meta")
    head.weight = nn.Parameter(model.lm_head.weight.detach()[ids].clone(), requires_grad=False)
    head.use_path(model.matmul)
    return head, ids


class Drafter(Method):
    """A method whose drafts come from trained modules. Subclasses set `checkpoint_option` (the
    option naming a checkpoint folder, e.g. "adapter"), optionally `checkpoint_env` and
    `missing_hint` (how to get one; "{model}" stands for the model), load their modules from `self.folder` (None: build seeded random ones), and
    list them in `trained_modules()`."""

    checkpoint_env: ClassVar[str | None] = None
    missing_hint: ClassVar[str] = ""

    def __init__(self, model: Transformer, **options: Any):
        super().__init__(model, **options)
        self.folder = self.locate_checkpoint()
        self.checkpoints: dict[str, str] = {}  # weight file -> sha256, recorded in config.json
        self.checkpoint_config: dict = {}
        self.ranking: torch.Tensor | None = None  # token ids by decreasing frequency (draft_vocab)
        if self.folder is not None:
            self.checkpoint_config = checkpoints.read_config(self.folder)
            self.checkpoints = checkpoints.folder_hashes(self.folder)
            self.ranking = checkpoints.read_vocab_ranking(self.folder)
        elif not random_fallback_allowed(model):
            raise MissingCheckpoint(f"no {self.name} checkpoint for {model.alias}. "
                                    + self.missing_hint.format(model=model.alias))
        else:
            warnings.warn(f"{self.name}: no checkpoint for {model.alias or 'this model'}; using a seeded random "
                          f"initialization (lossless, but its drafts are rarely accepted). Train one with "
                          f"`python -m bench train --method {self.name}`.", stacklevel=3)
        self.head: Linear | None = None
        self.head_ids: torch.Tensor | None = None

    def locate_checkpoint(self) -> Path | None:
        given = self.settings.get(self.checkpoint_option) or (
            os.environ.get(self.checkpoint_env) if self.checkpoint_env else None)
        if given:
            return Path(given)
        return checkpoints.committed_checkpoint(self.model.alias, self.name) or self.published_checkpoint()

    def published_checkpoint(self) -> Path | None:
        """A published checkpoint for this model, fetched where the machine reaches it (none by default)."""
        return None

    @property
    def recommended(self) -> dict:
        """The checkpoint's tuned defaults (`bench tune` writes them): the method's own, overlaid
        with those of a separately tuned variant (`variant_tuning_grids`) whose option is on."""
        stored = self.checkpoint_config.get("recommended", {})
        merged = {key: value for key, value in stored.items() if key not in self.variant_tuning_grids}
        for variant in self.variant_tuning_grids:
            if self.settings.get(variant):
                merged.update(stored.get(variant) or {})
        return merged

    def recommend(self, key: str, paper_default: Any) -> Any:
        """Fill an option left unset: the checkpoint's recommended value, else the paper's default."""
        if self.settings.get(key) is None:
            self.settings[key] = self.recommended.get(key, paper_default)
        return self.settings[key]

    def recommend_tree(self, paper: dict, cpu: dict, depth_key: str) -> None:
        """Fill a draft tree's budget left unset and check it. The papers' defaults (`paper`) hold for
        the Vicuna models they were tuned on, on a GPU; every other model gets `cpu`, a budget for the
        CPU path, where a verification past ~16 tokens costs well over a step. A checkpoint's tuned
        values come first either way. `depth_key` names the option that bounds the tree's depth."""
        defaults = paper if (self.model.alias or "").startswith("vicuna") else cpu
        for key, value in defaults.items():
            self.recommend(key, value)
        for key in (depth_key, "top_k"):
            if self.settings[key] < 1:
                raise ValueError(f"{self.name}: {key} must be at least 1, not {self.settings[key]}")
        if self.settings["total_tokens"] < 2:
            raise ValueError(f"{self.name}: total_tokens must be at least 2 (the pending token and one draft), "
                             f"not {self.settings['total_tokens']}")

    def ready(self, draft_vocab: int | None) -> None:
        """A constructor's last step: freeze the trained modules, route their products through the
        target's matmul path, and pick the draft head over `draft_vocab` words (None: the method
        scores with heads of its own)."""
        for module in self.trained_modules():
            module.requires_grad_(False).eval()
            set_matmul_path(module, self.model.matmul)
        if draft_vocab is not None:
            self.use_draft_vocab(draft_vocab)

    def use_draft_vocab(self, size: int) -> None:
        """Score drafts with the LM head's rows of the `size` most frequent tokens (0: the full head).
        A size that covers the vocabulary is the full head, and the option is recorded as 0."""
        ranking = self.ranking
        if ranking is None and size and self.model.vocab_ranking is not None and size < self.model.config.vocab_size:
            ranking = self.model.vocab_ranking()
        self.head, self.head_ids = draft_head(self.model, ranking, size)
        if self.head_ids is None:
            self.settings["draft_vocab"] = 0

    def draft_cache(self, name: str, needed: int, num_layers: int | None = None):
        """A KV cache of the method's own (e.g. for Kangaroo's adapter), grown on demand."""
        return self.grown_cache(name, needed, num_layers)

    def trained_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def overhead(self) -> Overhead:
        modules = self.trained_modules()
        params = sum(p.numel() for module in modules for p in module.parameters())
        extra = sum(module_bytes(module) for module in modules)
        if self.head_ids is not None:
            extra += module_bytes(self.head)
        extra += sum(cache.nbytes for name, cache in self._caches.items() if name != "target")
        return Overhead(trained_params=params, extra_memory_bytes=extra)
