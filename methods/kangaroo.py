"""Kangaroo: self-speculative decoding with double early exiting (Liu et al. 2024).

The draft model is the target's own first l layers, then an adapter (one attention block of the
target's kind without MLP, and one more norm), then the target's LM head. Drafting stops at the
second early exit: when the draft's top-1 probability falls below the threshold eta, or after
`steps` drafts. The shallow layers' KV entries and features computed while drafting are kept, so
verification runs only layers [l, N) on the saved features. The longest prefix of drafts that
matches the target's greedy tokens is accepted, plus the target's token after it.

`draft_vocab=N` scores drafts over the N most frequent tokens only (the LM head is 62% of the
embedded model); verification always uses the full vocabulary, so the output stays lossless.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from methods import Generation, Method, MissingCheckpoint, Option, Overhead, greedy, register
from methods import checkpoints
from methods.pld import longest_accepted_prefix
from methods.runtime import DecoderLayer, KVCache, Linear, RMSNorm, Transformer, module_bytes, set_matmul_path

PUBLISHED_HINT = ("Pass an adapter folder with --method-args kangaroo:adapter=PATH or KANGAROO_ADAPTER=PATH (the "
                  "published Vicuna-7B adapter, Equationliu/Kangaroo: config.json + pytorch_model.bin, has no hub "
                  "id), or train one with `make train MODEL=<model> METHOD=kangaroo` (on a GPU for Vicuna).")
DEFAULT_EXIT_LAYER = {"vicuna-13b": 3}  # else 2 (the paper's choice for Vicuna-7B)


class KangarooAdapter(nn.Module):
    """One attention block of the target's kind (no MLP) + a final norm: 4h² + 2h parameters for
    Llama. Tensor names follow the published adapter (`layers.0.self_attn.q_proj.weight`, ...)."""

    def __init__(self, model: Transformer):
        super().__init__()
        cfg = model.config
        self.layers = nn.ModuleList([DecoderLayer(cfg, with_mlp=False)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plus_one=cfg.gemma)

    def expected_shapes(self) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def initialize_from(self, model: Transformer, layer: int) -> None:
        """Start from a copy of the target's layer `layer` attention and its final norm."""
        source = model.layers[layer]
        own = self.layers[0]
        own.self_attn.load_state_dict(source.self_attn.state_dict())
        own.input_layernorm.load_state_dict(source.input_layernorm.state_dict())
        self.norm.load_state_dict(model.norm.state_dict())
        nn.init.zeros_(own.self_attn.o_proj.weight)  # start as the identity: shallow exit -> final norm -> head


def random_fallback_allowed(model: Transformer) -> bool:
    """Untrained (seeded random) drafters are for the random test models only; a real model
    without a checkpoint is skipped by default sweeps and an error when asked for by name."""
    return model.alias is None or model.alias.startswith("tiny-")


def load_adapter(folder: Path, model: Transformer) -> tuple[KangarooAdapter, dict]:
    """Our checkpoint (model.safetensors) or the published one (pytorch_model.bin); all tensors
    must be present with the model's shapes."""
    config = checkpoints.read_config(folder)
    state = checkpoints.read_tensors(folder, "pytorch_model.bin")
    adapter = KangarooAdapter(model).to(device=model.device, dtype=model.dtype)
    checkpoints.check_shapes(state, adapter.expected_shapes(), folder)
    adapter.load_state_dict(state, strict=True)
    return adapter, config


def draft_head(model: Transformer, ranking: torch.Tensor | None, size: int) -> tuple[Linear, torch.Tensor | None]:
    """The LM head restricted to the `size` most frequent tokens (a copy of those rows), or the
    model's own head when size is 0 or covers the vocabulary. Returns (head, token ids or None)."""
    vocab = model.config.vocab_size
    if size <= 0 or size >= vocab:
        return model.lm_head, None
    if ranking is None:
        raise ValueError("draft_vocab needs a token frequency ranking; none is available for this model")
    ids = ranking[:size].to(model.device)
    head = Linear(model.config.hidden_size, size, bias=False, device="meta")
    head.weight = nn.Parameter(model.lm_head.weight.detach()[ids].clone(), requires_grad=False)
    head.use_path(model.matmul)
    return head, ids


@register("kangaroo")
class Kangaroo(Method):
    description = "Kangaroo self-speculative decoding: shallow layers + adapter draft, double early exit"
    options = {
        "adapter": Option(str, None, "checkpoint folder (ours or the published format); default: the committed one"),
        "exit_layer": Option(int, None, "l, layers the draft shares with the target (default: the checkpoint's, else 2)"),
        "threshold": Option(float, None, "eta: stop drafting when the draft's top-1 probability is below it "
                                         "(default: the checkpoint's recommended, else 0.6 as the paper)"),
        "steps": Option(int, None, "gamma: at most this many drafts per step (default: the checkpoint's "
                                   "recommended, else 6)"),
        "draft_vocab": Option(int, 0, "score drafts over the N most frequent tokens only (0: full vocabulary)"),
    }

    def __init__(self, model: Transformer, **options):
        super().__init__(model, **options)
        self.checkpoints: dict[str, str] = {}
        folder = self.settings["adapter"] or os.environ.get("KANGAROO_ADAPTER")
        folder = Path(folder) if folder else checkpoints.committed_checkpoint(model.alias, "kangaroo")
        ranking, recommended = None, {}
        if folder is not None:
            self.adapter, config = load_adapter(folder, model)
            self.checkpoints = checkpoints.folder_hashes(folder)
            ranking = checkpoints.read_vocab_ranking(folder)
            trained_exit = config.get("options", {}).get("exit_layer", config.get("exit_layer"))
            recommended = config.get("recommended", {})
        elif not random_fallback_allowed(model):
            raise MissingCheckpoint(f"no Kangaroo adapter for {model.alias}. {PUBLISHED_HINT}")
        else:
            warnings.warn(f"kangaroo: no adapter for {model.alias or 'this model'}; using a seeded random "
                          f"initialization (lossless, but its drafts are rarely accepted). Train one with "
                          f"`python -m bench train --method kangaroo`.", stacklevel=2)
            generator = torch.Generator().manual_seed(0)
            self.adapter = KangarooAdapter(model)
            for name, parameter in self.adapter.named_parameters():
                if parameter.dim() > 1:
                    parameter.data = torch.randn(parameter.shape, generator=generator) * 0.02
            self.adapter.to(device=model.device, dtype=model.dtype)
            trained_exit = None
        for key, paper in (("threshold", 0.6), ("steps", 6)):
            if self.settings[key] is None:
                self.settings[key] = recommended.get(key, paper)
        default_exit = DEFAULT_EXIT_LAYER.get(model.alias or "", 2)
        self.exit_layer = self.settings["exit_layer"] or trained_exit or default_exit
        self.settings["exit_layer"] = self.exit_layer
        if not 1 <= self.exit_layer < model.config.num_layers:
            raise ValueError(f"kangaroo: exit_layer must be in 1..{model.config.num_layers - 1}")
        if trained_exit and self.exit_layer != trained_exit:
            warnings.warn(f"kangaroo: the adapter was trained at exit layer {trained_exit}, used at {self.exit_layer}")
        if ranking is None and self.settings["draft_vocab"] and model.vocab_ranking is not None:
            ranking = model.vocab_ranking()
        self.adapter.requires_grad_(False).eval()
        set_matmul_path(self.adapter, model.matmul)
        self.head, self.head_ids = draft_head(model, ranking, self.settings["draft_vocab"])
        if self.head_ids is None:
            self.settings["draft_vocab"] = 0  # a draft vocabulary as large as the model's is the full one
        self._adapter_cache: KVCache | None = None

    def overhead(self) -> Overhead:
        params = sum(p.numel() for p in self.adapter.parameters())
        extra = module_bytes(self.adapter)
        if self.head_ids is not None:
            extra += module_bytes(self.head)
        if self._adapter_cache is not None:
            extra += self._adapter_cache.nbytes
        return Overhead(trained_params=params, extra_memory_bytes=extra)

    def adapter_cache(self, needed: int) -> KVCache:
        if self._adapter_cache is None or self._adapter_cache.max_len < needed:
            self._adapter_cache = None  # freed before the larger one is allocated
            self._adapter_cache = self.model.new_cache(-(-needed // 256) * 256, num_layers=1)
        return self._adapter_cache

    def propose(self, adapted: torch.Tensor, produced: int) -> tuple[float, int]:
        """(top-1 probability, token id) of the next draft from the adapter's output [1, 1, H];
        `produced` is the index of that token among the new tokens (tests override this to feed
        oracle drafts)."""
        logits = self.head(self.adapter.norm(adapted))[0, -1].float()  # [V or draft_vocab]
        cap = self.model.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        probability, index = torch.softmax(logits, dim=-1).max(dim=-1)
        token = int(index) if self.head_ids is None else int(self.head_ids[index])
        return float(probability), token

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> Generation:
        started = time.perf_counter()
        model, stops, exit_layer = self.model, set(stop_ids), self.exit_layer
        shallow_layers, deep_layers = range(0, exit_layer), range(exit_layer, model.config.num_layers)
        gamma, threshold, block = self.settings["steps"], self.settings["threshold"], self.adapter.layers[0]
        needed = len(prompt_ids) + max_new_tokens + gamma + 2
        cache, adapter_cache = self.cache(needed), self.adapter_cache(needed)

        prompt = torch.tensor([prompt_ids], device=model.device)
        shallow = model.forward_layers(model.embed(prompt), cache, 0, layers=shallow_layers)  # [1, P, H]
        model.forward_block(block, shallow, adapter_cache, 0)  # the adapter's KV for the prompt
        hidden = model.forward_layers(shallow, cache, 0, layers=deep_layers)
        pending = int(greedy(model.logits(hidden[:, -1:])[0, -1]))  # committed, not yet in the cache
        prefill_seconds = time.perf_counter() - started
        length = len(prompt_ids)  # slots filled; `pending` goes to slot `length`
        new_ids, accept_lengths, draft_lengths = [pending], [1], [0]
        while pending not in stops and len(new_ids) < max_new_tokens:
            budget = min(gamma, max_new_tokens - len(new_ids) - 1)
            features, drafts, token = [], [], pending
            while True:  # draft: shallow layers + adapter, one token at a time
                slot = length + len(drafts)
                feature = model.forward_layers(model.embed(torch.tensor([[token]], device=model.device)),
                                               cache, slot, layers=shallow_layers)  # [1, 1, H]
                features.append(feature)
                adapted = model.forward_block(block, feature, adapter_cache, slot)  # keeps the adapter's KV whole
                if len(drafts) >= budget:
                    break
                probability, token = self.propose(adapted, len(new_ids) + len(drafts))
                if probability < threshold:  # the second early exit
                    break
                drafts.append(token)
            # verify: the deep layers on the saved features of [pending, drafts...]
            hidden = model.forward_layers(torch.cat(features, dim=1), cache, length, layers=deep_layers)
            target = greedy(model.logits(hidden)[0]).tolist()  # [1 + k]
            accepted = longest_accepted_prefix(drafts, target)
            committed = drafts[:accepted] + [target[accepted]]
            for i, committed_token in enumerate(committed):
                if committed_token in stops:
                    committed = committed[:i + 1]
                    break
            length += accepted + 1
            new_ids += committed
            accept_lengths.append(len(committed))
            draft_lengths.append(len(drafts))
            pending = committed[-1]
        return Generation(new_ids, accept_lengths, draft_lengths, prefill_seconds=prefill_seconds)


# ---- training -------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_norm(model: Transformer, adapter: KangarooAdapter, shallow: torch.Tensor, final: torch.Tensor,
                   head: torch.Tensor) -> float:
    """Scale the adapter's final norm by the factor (of a log grid) that minimizes the distillation
    loss on one sequence: a shallow exit through the final norm is confidently wrong over the
    whole vocabulary, and a student that starts nearer uniform learns faster. Returns the factor."""
    from methods.train import soft_distillation_loss, teacher_distribution
    student = adapter_outputs(model, adapter, shallow)
    softcap = model.config.final_logit_softcapping
    teacher = teacher_distribution(final.to(student.device), head, softcap)
    factors = torch.logspace(-2, 0, 21).tolist()
    losses = [float(soft_distillation_loss(student * f, teacher, head, softcap)) for f in factors]
    factor = factors[losses.index(min(losses))]
    weight = adapter.norm.weight
    if adapter.norm.plus_one:  # Gemma: x̂ (1 + w)
        weight.copy_((1 + weight) * factor - 1)
    else:
        weight.mul_(factor)
    return factor


def adapter_outputs(model: Transformer, adapter: KangarooAdapter, shallow: torch.Tensor) -> torch.Tensor:
    """The adapter's normed output [T, H] over one sequence's shallow features [T, H] (causal)."""
    cache = model.new_cache(shallow.shape[0], num_layers=1)
    adapted = model.forward_block(adapter.layers[0], shallow[None].to(model.device, model.dtype), cache, 0)
    return adapter.norm(adapted)[0].float()


def train_adapter(model: Transformer, adapter: KangarooAdapter, train_set, held_out, ranking: torch.Tensor,
                  candidates: int = 32768, minutes: float = 50, max_epochs: float = 8, lr: float = 5e-4,
                  batch_tokens: int = 2048):
    """Soft distillation of the adapter onto the full model's distribution at the same position
    (-Σ p·log q over the `candidates` most frequent tokens), assistant positions only."""
    from methods.train import (candidate_head, soft_distillation_loss, teacher_distribution, token_batches,
                               train_loop)
    head, _ = candidate_head(model, ranking, candidates)
    softcap = model.config.final_logit_softcapping
    batches = token_batches(train_set.loss_masks, batch_tokens)
    adapter.train().requires_grad_(True)

    def step_loss(batch: int):
        losses, tokens = [], 0
        for index in batches[batch]:
            mask = train_set.loss_masks[index].to(model.device)
            student = adapter_outputs(model, adapter, train_set.shallow[index])[mask]
            teacher = teacher_distribution(train_set.final[index].to(model.device)[mask], head, softcap)
            losses.append(soft_distillation_loss(student, teacher, head, softcap) * int(mask.sum()))
            tokens += int(mask.sum())
        return torch.stack(losses).sum() / tokens, tokens

    report = train_loop(adapter.parameters(), step_loss, len(batches), minutes, max_epochs, lr, desc="kangaroo")
    adapter.eval().requires_grad_(False)
    return report


@torch.no_grad()
def evaluate_adapter(model: Transformer, adapter: KangarooAdapter, held_out, ranking: torch.Tensor,
                     candidates: int = 32768, thresholds=(0.0, 0.2, 0.4, 0.6, 0.8)) -> dict:
    """Held-out agreement with the full model's greedy token: top-1 over the full vocabulary and
    over the candidate vocabulary, and per threshold eta the share of positions whose draft
    probability reaches eta and how often those drafts are right."""
    from methods.train import candidate_head
    head, head_ids = candidate_head(model, ranking, candidates)
    full_head = model.lm_head.weight.detach().float()
    right_full = right_candidates = total = 0
    probabilities, correct = [], []
    for shallow, final, mask in zip(held_out.shallow, held_out.final, held_out.loss_masks):
        mask = mask.to(model.device)
        student = adapter_outputs(model, adapter, shallow)[mask]
        teacher_tokens = (final.to(model.device)[mask] @ full_head.T).argmax(-1)
        student_full = (student @ full_head.T)
        right_full += int((student_full.argmax(-1) == teacher_tokens).sum())
        candidate_probs = torch.softmax(student @ head.T, dim=-1)
        top_probability, top_index = candidate_probs.max(-1)
        hit = head_ids[top_index] == teacher_tokens
        right_candidates += int(hit.sum())
        probabilities.append(top_probability)
        correct.append(hit)
        total += int(mask.sum())
    probabilities, correct = torch.cat(probabilities).cpu(), torch.cat(correct).cpu()
    sweep = {}
    for eta in thresholds:
        confident = probabilities >= eta
        sweep[str(eta)] = {"drafted": float(confident.float().mean()),
                           "right_when_drafted": float(correct[confident].float().mean()) if confident.any() else 0.0}
    return {"tokens": total, "agreement_full_vocab": right_full / max(total, 1),
            "agreement_candidates": right_candidates / max(total, 1), "threshold_sweep": sweep}
