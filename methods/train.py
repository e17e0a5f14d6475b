"""The shared training loop for drafters: frozen target, precomputed features, distillation.

Features are computed once per token and kept in memory: the shallow hidden state after layer l
(Kangaroo's draft input) and the target's final hidden state after its final norm (the teacher; its
distribution is recomputed through the LM head at train time over a candidate vocabulary of the most
frequent tokens, instead of storing 262k probabilities per token).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from methods import checkpoints
from methods.runtime import Transformer


@dataclass
class Sequence:
    ids: torch.Tensor  # [T] token ids
    loss_mask: torch.Tensor  # [T] bool: position t is trained to predict token t + 1 (an answer token)


@dataclass
class TrainingJob:
    """What `bench train` hands a method's `train` hook: the frozen model, token sequences (their
    answer positions carry the loss), the candidate vocabulary and the budget. The hook trains,
    evaluates on `held_out` and saves a checkpoint folder in `out`; it returns that folder's config."""
    runtime: Transformer
    alias: str
    family: str
    train: list[Sequence]
    held_out: list[Sequence]
    ranking: torch.Tensor  # token ids by decreasing frequency
    out: Path
    data: str  # where the sequences come from, for the provenance
    minutes: float = 50
    epochs: float = 8
    lr: float | None = None
    candidates: int = 32768
    seed: int = 0
    resume: Path | None = None
    options: dict = field(default_factory=dict)  # the method's own training options (train_options)
    started: float = field(default_factory=time.perf_counter)

    def history(self, previous: dict | None, report: "TrainReport", lr: float, tokens: int) -> list[dict]:
        """The checkpoint's training history: the earlier jobs' (when resumed) and this one."""
        entries = list((previous or {}).get("provenance", {}).get("history", []))
        entries.append({"tokens": tokens, "epochs": round(report.epochs, 3), "steps": report.steps,
                        "minutes": round(report.seconds / 60, 2), "final_loss": round(report.final_loss, 4),
                        "lr": lr, "seed": self.seed, "data": self.data, "git_commit": checkpoints.git_commit(),
                        **({"curve": report.curve} if report.curve else {})})
        return entries

    def save(self, method: str, module: nn.Module, options: dict, objective: str, report: "TrainReport", lr: float,
             tokens: int, held_out_tokens: int, evaluation: dict, previous: dict | None = None,
             recommended: dict | None = None) -> dict:
        """Save `module` as the checkpoint folder `out` (methods/checkpoints.py's format) with its
        provenance: data, objective, tokens, minutes, this job and the earlier ones (when resumed),
        and the held-out evaluation. Returns the config."""
        config = {"method": method, "base_model": self.alias, "family": self.family,
                  "shapes": {k: list(v.shape) for k, v in module.state_dict().items()}, "options": options,
                  **({"recommended": recommended} if recommended else {}),
                  "provenance": {"data": self.data, "objective": objective, "tokens": tokens,
                                 "held_out_tokens": held_out_tokens,
                                 "total_minutes": round((time.perf_counter() - self.started) / 60, 2),
                                 "history": self.history(previous, report, lr, tokens), "held_out": evaluation}}
        checkpoints.save(self.out, module.state_dict(), config, vocab_ranking=self.ranking[:65536])
        return config


@dataclass
class FeatureSet:
    ids: list[torch.Tensor] = field(default_factory=list)  # [T] per sequence
    loss_masks: list[torch.Tensor] = field(default_factory=list)  # [T] bool
    shallow: list[torch.Tensor] = field(default_factory=list)  # [T, H] after layer l (if asked)
    final: list[torch.Tensor] = field(default_factory=list)  # [T, H] after the final norm

    @property
    def tokens(self) -> int:
        return int(sum(int(mask.sum()) for mask in self.loss_masks))

    def first(self, tokens: int) -> "FeatureSet":
        """The leading sequences that hold at least `tokens` loss tokens (all, if fewer): a cheap
        held-out sample for the curve a training job records as it goes."""
        count, seen = 0, 0
        while count < len(self.loss_masks) and seen < tokens:
            seen += int(self.loss_masks[count].sum())
            count += 1
        return FeatureSet(*(values[:count] for values in (self.ids, self.loss_masks, self.shallow, self.final)))


@torch.inference_mode()
def precompute_features(model: Transformer, sequences, exit_layer: int | None, desc: str = "features") -> FeatureSet:
    """Run the frozen target once over every sequence (objects with .ids and .loss_mask)."""
    features = FeatureSet()
    n = model.config.num_layers
    for sequence in tqdm(sequences, desc=desc, unit="seq", file=sys.stderr, dynamic_ncols=True):
        ids = sequence.ids.to(model.device)[None]  # [1, T]
        cache = model.new_cache(ids.shape[1])
        hidden = model.embed(ids)
        if exit_layer is not None:
            hidden = model.forward_layers(hidden, cache, 0, layers=range(0, exit_layer))
            features.shallow.append(hidden[0].to("cpu", torch.float32).clone())
            hidden = model.forward_layers(hidden, cache, 0, layers=range(exit_layer, n))
        else:
            hidden = model.forward_layers(hidden, cache, 0)
        features.final.append(model.norm(hidden)[0].to("cpu", torch.float32).clone())
        features.ids.append(sequence.ids.cpu())
        features.loss_masks.append(sequence.loss_mask.cpu())
    return features


def token_batches(loss_masks: list[torch.Tensor], batch_tokens: int) -> list[list[int]]:
    """Consecutive sequence indices grouped so that each group holds about `batch_tokens` trained positions."""
    batches, current, size = [], [], 0
    for index, mask in enumerate(loss_masks):
        current.append(index)
        size += int(mask.sum())
        if size >= batch_tokens:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def candidate_head(model: Transformer, ranking: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM-head rows of the `size` most frequent tokens [size, H], their ids [size])."""
    ids = ranking[:size].to(model.lm_head.weight.device)
    return model.lm_head.weight.detach()[ids].float(), ids


def head_logits(hidden: torch.Tensor, head: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Logits over the candidate vocabulary: hidden [T, H] @ head [V', H]ᵀ, soft-capped if configured."""
    out = hidden.to(head.device, head.dtype) @ head.T
    return torch.tanh(out / softcap) * softcap if softcap else out


@torch.no_grad()
def teacher_distribution(final: torch.Tensor, head: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """The full model's distribution over the candidate vocabulary from its normed final hidden state."""
    return torch.softmax(head_logits(final, head, softcap), dim=-1)


def soft_distillation_loss(student_hidden: torch.Tensor, teacher: torch.Tensor, head: torch.Tensor,
                           softcap: float | None = None) -> torch.Tensor:
    """-Σ p·log q over the candidate vocabulary, mean over positions: p = `teacher` [T, V'] (see
    teacher_distribution), q from the student's normed output [T, H] through `head` [V', H]."""
    return -(teacher * torch.log_softmax(head_logits(student_hidden, head, softcap), dim=-1)).sum(-1).mean()


@dataclass
class TrainReport:
    steps: int = 0
    epochs: float = 0.0
    tokens_seen: int = 0
    seconds: float = 0.0
    final_loss: float = math.nan
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)  # held-out figure against training minutes


def train_loop(module: nn.Module, step_loss, batches: int, minutes: float, max_epochs: float, lr: float,
               clip: float = 0.5, desc: str = "train", evaluate=None, eval_minutes: float = 10) -> TrainReport:
    """AdamW (0.9, 0.95), gradient clipping, a progress bar and a wall-clock budget. The learning
    rate warms up over 20 steps, then follows a cosine to a tenth of `lr` over whichever ends first,
    the planned epochs or the minutes, so a job cut by its budget still ends annealed.
    `step_loss(i)` returns (loss, tokens) for batch i mod `batches`. `evaluate()`, when given, is
    called every `eval_minutes` and at the end, with `module` in eval mode; its held-out figure
    goes into report.curve."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    total, budget = max(1, int(batches * max_epochs)), 60 * minutes
    report, started, smoothed = TrainReport(), time.perf_counter(), None
    next_eval = 60 * eval_minutes

    def checkpoint_curve():
        if evaluate is not None:
            module.eval()
            value = float(evaluate())
            module.train()
            report.curve.append({"minutes": round((time.perf_counter() - started) / 60, 2), "steps": report.steps,
                                 "held_out": round(value, 4)})
            print(f"[train] {report.curve[-1]}", file=sys.stderr)

    progress = tqdm(range(total), desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    for step in progress:
        elapsed = time.perf_counter() - started
        done = max(step / total, elapsed / budget) if budget > 0 else step / total
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0))))
        loss, tokens = step_loss(step % batches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        report.losses.append(value)
        report.steps, report.tokens_seen = step + 1, report.tokens_seen + tokens
        progress.set_postfix(loss=f"{smoothed:.3f}")
        if time.perf_counter() - started > next_eval:
            checkpoint_curve()
            next_eval += 60 * eval_minutes
        if time.perf_counter() - started > budget:
            print(f"[train] time budget of {minutes} min reached after {step + 1} of {total} steps", file=sys.stderr)
            break
    report.seconds = time.perf_counter() - started
    report.epochs = report.steps / batches
    report.final_loss = smoothed if smoothed is not None else math.nan
    checkpoint_curve()
    return report


def chain_acceptance(correct: list[torch.Tensor], depth: int) -> list[float]:
    """Per draft position, the acceptance a greedy drafter would see from its teacher-forced
    correctness: `correct` holds one bool vector per sequence (the draft for token t + 1 equals
    the target's), and position i of a chain started at t is accepted when tokens t..t+i all are.
    Returns, for i < depth, chains correct through i ÷ chains correct through i - 1."""
    reached = [0] * (depth + 1)
    for hits in correct:
        hits = hits.to(torch.int32).cpu()
        run = torch.zeros_like(hits)
        for t in range(hits.numel() - 1, -1, -1):  # run[t]: consecutive hits from t on
            run[t] = hits[t] * (1 + (run[t + 1] if t + 1 < hits.numel() else 0))
        for i in range(depth + 1):
            reached[i] += int((run >= i).sum()) if i else hits.numel()
    return [reached[i + 1] / reached[i] if reached[i] else 0.0 for i in range(depth)]

