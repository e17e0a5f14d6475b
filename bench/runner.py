"""The sweep: every method over the chosen Spec-Bench questions, timed as Spec-Bench times them.

Protocol (DESIGN.md §7): batch size 1, greedy, one untimed warm-up generation on the first question,
device sync then `time.perf_counter()` around generation only. Multi-turn questions feed the
method's own earlier answers back in. Each question's answer line is written atomically as soon as
it is done, so an interrupted run resumes where it stopped; a question that fails is recorded with
its error and the run goes on. `vanilla` always runs first: speedups and the lossless check
(identical / near_tie / diverged, see `classify`) are measured against it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import methods
from bench import data
from bench.device import hardware, peak_memory_bytes, reset_peak_memory, sync, unusable_gpu_problem
from bench.drafts import vllm_acceptance
from bench.errors import UserError
from bench.lossless import classify
from bench.models import LoadedModel, load_model
from bench.specs import MethodSpec, parse_method_args, parse_method_specs, resolve
from methods import MissingCheckpoint
from methods.products import MATMUL_PATHS, pick_matmul_path

ORDERS = ("method", "question")  # RunSettings.order; see run_methods
PACKAGES = ("torch", "transformers", "numpy", "pandas", "safetensors", "tokenizers", "gguf", "accelerate")


@dataclass
class RunSettings:
    model: str = "gemma-3-270m"
    methods: str | None = None  # None: the default sweep (methods.default_sweep), skipping methods without a checkpoint
    categories: str | None = None
    limit: int | None = None
    max_new_tokens: int = 1024
    runs: int = 1
    questions: str | None = None
    out: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    matmul: str = "auto"
    method_args: list[str] = field(default_factory=list)
    template: str | None = None
    temperature: float = 0.0  # 0: greedy; above: sampled from softmax(logits / T) (DESIGN.md §4)
    seed: int = 0  # with the question id, run index and turn, seeds each turn's generator at T > 0
    questions_sha256: str | None = None  # when set (rerun from a config), the question file must match
    device_map: str | None = None  # "auto": transformers places the model (bench.models.resolve_device_map)
    order: str = "method"  # "method": one method over all questions, then the next; "question": all methods per question


# ---- config ------------------------------------------------------------------------------------
def config_hash(config: dict) -> str:
    determining = {k: v for k, v in config.items() if k not in ("config_hash", "environment")}
    determining["questions"] = {"sha256": config["questions"]["sha256"]}  # not the path: it varies by machine
    return hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()


def environment() -> dict:
    import importlib.metadata as metadata
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", False
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "packages": packages, "hardware": hardware(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def prepare_out_dir(out: Path, config: dict) -> dict:
    """Create DIR or check that the run it holds has the same config (then the run resumes).
    A run with the same settings but fewer methods may be extended with new ones."""
    path = out / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON ({error}); move the directory away or pick another --out")
        differences = [k for k in sorted(set(old) | set(config))
                       if k not in ("config_hash", "environment", "methods", "questions") and old.get(k) != config.get(k)]
        if old.get("questions", {}).get("sha256") != config["questions"]["sha256"]:
            differences.append("questions")
        changed = [label for label, entry in config["methods"].items() if label in old.get("methods", {})
                   and old["methods"][label].get("options") != entry["options"]]
        if differences or changed:
            what = ", ".join(differences + [f"methods[{label}]" for label in changed])
            raise UserError(f"{out} holds a run with a different config ({what} differ). Its answers are kept: "
                            f"pass another --out to start a new run, or delete {out} to replace it.")
        merged = dict(old.get("methods", {}))
        for label, entry in config["methods"].items():  # keep what the earlier run recorded (checkpoint hashes)
            merged[label] = {**merged.get(label, {}), **entry}
        config = {**config, "methods": merged}
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers").mkdir(exist_ok=True)
    config["config_hash"] = config_hash(config)
    write_atomic(path, json.dumps(config, indent=2) + "\n")
    return config


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ---- answers -----------------------------------------------------------------------------------
def read_answers(path: Path) -> dict[int, dict]:
    records: dict[int, dict] = {}
    if not path.exists():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[int(record["question_id"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path}, line {number}: not a valid answer line ({error}). Fix or delete that line "
                            f"(that question is then rerun), or pick another --out.") from None
    return records


def write_answers(path: Path, records: dict[int, dict]) -> None:
    lines = [json.dumps(records[q], ensure_ascii=False) for q in sorted(records)]
    write_atomic(path, "\n".join(lines) + "\n")


def sampling_seed(seed: int, question_id, run_index: int, turn: int) -> int:
    """The seed of one (question, run, turn)'s generator: a resumed, sharded or Ray run draws the
    same samples, and each run index is an independent sample."""
    digest = hashlib.sha256(f"{seed}/{question_id}/{run_index}/{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def sampling_for(model: LoadedModel, temperature: float, seed: int, question_id, run_index: int,
                 turn: int) -> methods.Sampling | None:
    """The decoding policy of one turn: None (greedy) at temperature 0, else T with its own generator."""
    if not temperature:
        return None
    generator = torch.Generator(device=model.runtime.device)
    generator.manual_seed(sampling_seed(seed, question_id, run_index, turn))
    return methods.Sampling(temperature, generator)


def answer_question(model: LoadedModel, method, question: dict, max_new_tokens: int, run_index: int,
                    temperature: float = 0.0, seed: int = 0) -> dict:
    """One choice of the answer schema: every turn, generated and timed (at temperature > 0 each
    turn samples with its own seeded generator, made before the clock starts)."""
    answers, choice = [], {"index": run_index, "turns": [], "decoding_steps": [], "new_tokens": [],
                           "wall_time": [], "prefill_time": [], "accept_lengths": [], "draft_lengths": [],
                           "output_ids": []}
    device, stops = model.runtime.device, set(model.stop_ids)
    for turn in range(len(question["turns"])):
        prompt_ids = model.prompt_ids(question["turns"][:turn + 1], answers)
        warn_past_positions(model, question, turn, len(prompt_ids), max_new_tokens)
        policy = sampling_for(model, temperature, seed, question["question_id"], run_index, turn)
        extra = {"sampling": policy} if policy else {}
        sync(device)
        started = time.perf_counter()
        generation = method.generate(prompt_ids, max_new_tokens, model.stop_ids, **extra)
        sync(device)
        wall = time.perf_counter() - started
        text = model.tokenizer.decode([t for t in generation.new_ids if t not in stops]).strip()
        answers.append(text)
        choice["turns"].append(text)
        choice["decoding_steps"].append(len(generation.accept_lengths))
        choice["new_tokens"].append(len(generation.new_ids))
        choice["wall_time"].append(wall)
        choice["prefill_time"].append(generation.prefill_seconds)
        choice["accept_lengths"] += generation.accept_lengths
        choice["draft_lengths"] += generation.draft_lengths
        choice["output_ids"].append(generation.new_ids)
    return choice


# ---- the sweep ---------------------------------------------------------------------------------
def build_method(spec: MethodSpec, options: dict, model: LoadedModel):
    try:
        return methods.get(spec.name)(model.runtime, **options)
    except MissingCheckpoint:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f"method {spec.label}: {error}") from None


@dataclass
class Plan:
    """What a run does, checked before any model loads: method specs, options and questions."""
    specs: list[MethodSpec]  # vanilla first
    explicit: bool  # --methods given: a method without a checkpoint is an error, not a skipped row
    options: dict[str, dict]  # label -> fully resolved options
    groups: list[str]
    questions_file: Path
    pinned: bool
    questions_sha256: str
    questions: list[dict]


def plan_run(settings: RunSettings) -> Plan:
    """Check the settings and resolve methods and questions (no model is loaded)."""
    if settings.limit is not None and settings.limit <= 0:
        raise UserError("--limit must be a positive integer (questions per group)")
    if settings.max_new_tokens <= 0 or settings.runs <= 0:
        raise UserError("--max-new-tokens and --runs must be positive integers")
    if not settings.temperature >= 0 or settings.temperature == float("inf"):
        raise UserError(f"--temperature must be 0 (greedy) or a positive number, not {settings.temperature}")
    explicit = settings.methods is not None
    specs = parse_method_specs(settings.methods or ",".join(methods.default_sweep()))
    if "vanilla" not in [s.label for s in specs]:
        specs.insert(0, MethodSpec("vanilla"))
    specs.sort(key=lambda s: s.label != "vanilla")  # vanilla first: the others are compared with it
    defaults = parse_method_args(settings.method_args)
    options = {s.label: resolve(s, defaults) for s in specs}
    groups = data.resolve_categories(settings.categories)
    questions_file, pinned = data.questions_path(settings.questions)
    questions_sha256 = data.file_sha256(questions_file)
    if settings.questions_sha256 and settings.questions_sha256 != questions_sha256:
        raise UserError(f"the config was run on questions with sha256 {settings.questions_sha256}, but "
                        f"{questions_file} has {questions_sha256}: pass that question file with --questions PATH")
    questions = data.select_questions(data.load_questions(questions_file), groups, settings.limit)
    if settings.order not in ORDERS:
        raise UserError(f"unknown --order {settings.order!r}; valid: {', '.join(ORDERS)}")
    if settings.matmul not in ("auto",) + MATMUL_PATHS:
        raise UserError(f"unknown --matmul {settings.matmul!r}; valid: auto, {', '.join(MATMUL_PATHS)}")
    return Plan(specs, explicit, options, groups, Path(questions_file), pinned, questions_sha256, questions)


def load_run_model(settings: RunSettings) -> LoadedModel:
    problem = unusable_gpu_problem() if settings.device != "cpu" else None
    if problem:
        raise UserError(problem)
    model = load_model(settings.model, settings.device, settings.dtype, settings.template, settings.device_map)
    if settings.matmul in ("blas", "kernel") and model.runtime.device.type != "cpu":
        raise UserError(f"--matmul {settings.matmul} is a CPU path; use auto or torch on a GPU")
    return model


def resolved_matmul(config: dict) -> str | None:
    """The product path a run's `--matmul` resolved to on its machine (config.json's environment;
    older runs recorded it as `matmul` itself)."""
    return (config.get("environment") or {}).get("matmul_resolved") or config.get("matmul")


def resumed_matmul(out: Path, requested: str) -> str:
    """The matmul path to ask for: when resuming with `auto`, the path the run started with, so that
    every method of a run decodes on one path."""
    if requested == "auto" and (out / "config.json").exists():
        return resolved_matmul(json.loads((out / "config.json").read_text())) or "auto"
    return requested


def model_facts(model: LoadedModel) -> dict:
    """The config fields that come from the loaded model."""
    return {"model": model.alias, "model_source": model.source, "family": model.family, "template": model.template,
            "device": model.runtime.device.type, "dtype": str(model.runtime.dtype).removeprefix("torch.")}


def build_config(facts: dict, matmul: str, plan: Plan, settings: RunSettings, launcher: dict | None = None) -> dict:
    """config.json before prepare_out_dir: `facts` from model_facts; `matmul` is the path the
    requested `--matmul` resolved to, which like `launcher` goes into the environment section: it
    depends on the machine as the CPU model does, and does not enter the config hash."""
    environment_section = environment()
    environment_section.update(launcher or {"launcher": "local"})
    environment_section["matmul_resolved"] = matmul
    if settings.device_map not in (None, "none"):
        environment_section["device_map"] = settings.device_map
    return {
        **facts,
        "matmul": settings.matmul,  # as requested (auto, torch, blas or kernel)
        "questions": {"path": str(plan.questions_file), "sha256": plan.questions_sha256, "pinned": plan.pinned},
        "categories": plan.groups, "limit": settings.limit, "max_new_tokens": settings.max_new_tokens,
        "runs": settings.runs,
        # the decoding policy: absent at its default (greedy), so older runs keep their hash and resume
        **({"temperature": settings.temperature, "seed": settings.seed} if settings.temperature else {}),
        **({"order": settings.order} if settings.order != "method" else {}),  # absent at its default, as above
        "methods": {s.label: {"name": s.name, "spec": s.label, "options": plan.options[s.label]}
                    for s in plan.specs},
        "environment": environment_section,
    }


def run(settings: RunSettings) -> Path:
    """Run (or resume) a sweep. Returns the run directory (the command line then writes its report)."""
    plan = plan_run(settings)
    model = load_run_model(settings)
    out = Path(settings.out or Path("runs") / model.alias)
    try:  # the same path for every method
        matmul = pick_matmul_path(model.runtime, resumed_matmul(out, settings.matmul))
    except ValueError as error:
        raise UserError(f"--matmul: {error}") from None
    config = prepare_out_dir(out, build_config(model_facts(model), matmul, plan, settings))
    print(f"[run] {len(plan.questions)} questions ({', '.join(plan.groups)}), {settings.max_new_tokens} new tokens, "
          f"{settings.runs} run(s), on {config['device']}/{config['dtype']}; writing {out}", file=sys.stderr)
    stats_path = out / "method_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    run_methods(model, plan, plan.questions, settings, out, config, stats)
    config["config_hash"] = config_hash(config)
    write_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def run_methods(model: LoadedModel, plan: Plan, questions: list[dict], settings: RunSettings, out: Path,
                config: dict, stats: dict) -> dict:
    """Every method of the plan, vanilla first, over `questions`: answers into out/answers/, the
    methods' statuses and overheads into `stats` (saved as out/method_stats.json after each method),
    checkpoints and effective options into config["methods"]. Returns `stats`. A launcher runs this
    on a subset of the questions (a cell) with its own `out`.

    `settings.order` "method" (Spec-Bench's order) builds, runs and drops one method at a time over
    all questions; "question" builds every method first and runs them all on a question before the
    next, so each method is timed seconds after vanilla on the same question: on a host whose speed
    drifts (shared cores, memory bandwidth that changes from minute to minute) its ratios stay
    paired. A method's peak memory is then its windows' resident peak less the other live methods'
    extra memory.

    A variant that resolves to the same method as an earlier one on this model (e.g.
    `kangaroo+draft_vocab=32768` on a 32,000-token vocabulary) is skipped with a note, not timed twice."""
    stats_path = out / "method_stats.json"
    (out / "answers").mkdir(parents=True, exist_ok=True)
    reference: dict[int, dict] = {}
    # per label built: its identity (name, effective options, checkpoint hashes, as JSON: a twin has
    # the same) and its checkpoint files' hashes, kept after the method object is dropped
    resolved: dict[str, str] = {}
    loaded_checkpoints: dict[str, dict] = {}

    def skip(spec: MethodSpec, reason: str) -> None:
        print(f"[run] skipping {spec.label}: {reason}", file=sys.stderr)
        stats[spec.label] = {"name": spec.name, "status": "skipped", "reason": reason, "trained_params": 0,
                             "extra_memory_bytes": 0, "peak_memory_bytes": None}
        write_atomic(stats_path, json.dumps(stats, indent=2) + "\n")

    def built():
        """(spec, method) for every method that runs, built one at a time as the caller asks."""
        for spec in plan.specs:
            try:
                method = build_method(spec, plan.options[spec.label], model)
            except MissingCheckpoint as error:
                if plan.explicit:
                    raise UserError(f"method {spec.label}: {error}") from None
                skip(spec, str(error))
                continue
            loaded = getattr(method, "checkpoints", {})
            identity = json.dumps([spec.name, method.settings, sorted(loaded.values())], sort_keys=True, default=str)
            twin = next((label for label, other in resolved.items() if other == identity), None)
            if twin is not None:
                skip(spec, f"the same method as {twin} on this model (effective options "
                           f"{json.dumps(method.settings, default=str)}): not timed twice")
                del method
                continue
            resolved[spec.label], loaded_checkpoints[spec.label] = identity, dict(loaded)
            previous = config["methods"][spec.label].get("checkpoints") or {}
            if previous and loaded and sorted(previous.values()) != sorted(loaded.values()):
                raise UserError(f"{out} was run with other checkpoint files for {spec.label} than the ones loaded now "
                                f"({', '.join(loaded)}); pass another --out to start a new run")
            yield spec, method

    def finish(spec: MethodSpec, records: dict[int, dict], peak: int | None, overhead, rule: str) -> None:
        nonlocal reference
        loaded_identity = json.loads(resolved[spec.label])
        if not settings.temperature:  # sampled tokens cannot equal vanilla's: no token-level check
            classify_records(model, spec, questions, records, reference, out)
        if spec.label == "vanilla":
            reference = records
        config["methods"][spec.label]["checkpoints"] = loaded_checkpoints[spec.label]
        # what the method made of its options (e.g. an exit layer taken from its checkpoint)
        config["methods"][spec.label]["effective_options"] = loaded_identity[1]
        if peak is None:  # nothing ran now (a resumed run): keep the figure measured before
            peak = stats.get(spec.label, {}).get("peak_memory_bytes")
        stats[spec.label] = {"name": spec.name, "status": "ok", "reason": None, "rule": rule,
                             "trained_params": overhead.trained_params,
                             "extra_memory_bytes": overhead.extra_memory_bytes,
                             "peak_memory_bytes": peak,
                             "acceptance": vllm_acceptance([records[q["question_id"]] for q in questions
                                                            if q["question_id"] in records])}
        write_atomic(stats_path, json.dumps(stats, indent=2) + "\n")

    def rule_of(method) -> str:
        return "greedy" if not settings.temperature else type(method).acceptance_name(method.settings)

    if settings.order == "method":
        for spec, method in built():
            records, peak = run_method(model, method, spec, questions, settings, out)
            overhead, rule = method.overhead(), rule_of(method)
            del method  # its caches go before the lossless check allocates its own
            finish(spec, records, peak, overhead, rule)
        return stats
    live = list(built())
    outcomes = run_interleaved(model, live, questions, settings, out)
    finals = [(spec, outcomes[spec.label], method.overhead(), rule_of(method)) for spec, method in live]
    live.clear()  # every method's caches go before the lossless checks allocate their own
    method = None
    for spec, (records, peak), overhead, rule in finals:
        finish(spec, records, peak, overhead, rule)
    return stats


def warm_up(model: LoadedModel, method, spec: MethodSpec, question: dict, settings: RunSettings) -> None:
    """One untimed generation on `question`'s first turn; a failure is printed and shows again,
    recorded, when that question runs."""
    policy = sampling_for(model, settings.temperature, settings.seed, "warm-up", 0, 0)
    try:
        method.generate(model.prompt_ids(question["turns"][:1], []), settings.max_new_tokens, model.stop_ids,
                        **({"sampling": policy} if policy else {}))
    except Exception as error:  # noqa: BLE001
        print(f"[run] {spec.label} warm-up failed: {type(error).__name__}: {error}", file=sys.stderr)


def answer_record(model: LoadedModel, method, spec: MethodSpec, question: dict, settings: RunSettings) -> dict:
    """The answer line of one question: every run of it, or the error it failed with."""
    qid = question["question_id"]
    record = {"question_id": qid, "category": question["category"], "group": question["group"],
              "answer_id": hashlib.sha1(f"{spec.label}/{qid}".encode()).hexdigest()[:22],
              "model_id": spec.label, "choices": [], "tstamp": time.time()}
    try:
        for run_index in range(settings.runs):
            record["choices"].append(answer_question(model, method, question, settings.max_new_tokens, run_index,
                                                     settings.temperature, settings.seed))
    except Exception as error:  # recorded, and the run goes on (DESIGN.md §7)
        if isinstance(error, KeyboardInterrupt):
            raise
        record["choices"] = []
        record["error"] = f"{type(error).__name__}: {error}"
        print(f"[run] {spec.label} question {qid} failed: {record['error']}\n"
              f"{''.join(traceback.format_exception(error)[-3:])}", file=sys.stderr)
        if model.runtime.device.type == "cuda":
            torch.cuda.empty_cache()
    record["tstamp"] = time.time()
    return record


def throughput(record: dict) -> str:
    tokens = sum(sum(c["new_tokens"]) for c in record["choices"])
    seconds = sum(sum(c["wall_time"]) for c in record["choices"])
    return f"{tokens / seconds:.1f}" if seconds else "-"


def pending(records: dict[int, dict], questions: list[dict]) -> list[dict]:
    """The questions without a finished answer (none yet, or an error: a rerun retries it)."""
    return [q for q in questions if "error" in records.get(q["question_id"], {"error": None})]


def run_method(model: LoadedModel, method, spec: MethodSpec, questions: list[dict], settings: RunSettings,
               out: Path) -> tuple[dict[int, dict], int | None]:
    """Generate (or resume) the answers of one method: (records by question id, the method's peak
    memory over its warm-up and questions, or None when no question was left to run)."""
    path = out / "answers" / f"{spec.file_name}.jsonl"
    records = read_answers(path)
    todo = pending(records, questions)
    if not todo:
        return records, None
    reset_peak_memory(model.runtime)  # the window covers this method alone (bench/device.py)
    warm_up(model, method, spec, questions[0], settings)
    progress = tqdm(todo, desc=f"{spec.label:>16}", unit="q", file=sys.stderr, dynamic_ncols=True)
    for question in progress:
        records[question["question_id"]] = record = answer_record(model, method, spec, question, settings)
        if record["choices"]:
            progress.set_postfix(tok_s=throughput(record))
        write_answers(path, records)
    return records, peak_memory_bytes(model.runtime)


def run_interleaved(model: LoadedModel, live: list[tuple[MethodSpec, object]], questions: list[dict],
                    settings: RunSettings, out: Path) -> dict[str, tuple[dict[int, dict], int | None]]:
    """Question order: every live method (vanilla first) on a question, then the next question.
    Returns, per label, (records by question id, peak memory or None when nothing ran)."""
    paths = {spec.label: out / "answers" / f"{spec.file_name}.jsonl" for spec, _ in live}
    records = {label: read_answers(path) for label, path in paths.items()}
    todo = {label: {q["question_id"] for q in pending(records[label], questions)} for label in paths}
    extra = {spec.label: method.overhead().extra_memory_bytes for spec, method in live}
    peaks: dict[str, int | None] = {label: None for label in paths}

    def measured(label: str, window) -> None:
        reset_peak_memory(model.runtime)
        window()
        others = sum(size for other, size in extra.items() if other != label)
        peak = peak_memory_bytes(model.runtime) - others
        peaks[label] = max(peaks[label] or 0, peak)

    for spec, method in live:
        if todo[spec.label]:
            measured(spec.label, lambda: warm_up(model, method, spec, questions[0], settings))
    progress = tqdm([q for q in questions if any(q["question_id"] in ids for ids in todo.values())],
                    desc="questions", unit="q", file=sys.stderr, dynamic_ncols=True)
    for question in progress:
        qid = question["question_id"]
        rates = {}
        for spec, method in live:
            if qid not in todo[spec.label]:
                continue

            def window(spec=spec, method=method):
                records[spec.label][qid] = answer_record(model, method, spec, question, settings)
            measured(spec.label, window)
            write_answers(paths[spec.label], records[spec.label])
            if records[spec.label][qid]["choices"]:
                rates[spec.label] = throughput(records[spec.label][qid])
        progress.set_postfix_str(" ".join(f"{label}={rate}" for label, rate in rates.items())[:120])
    return {label: (records[label], peaks[label]) for label in paths}


def classify_records(model: LoadedModel, spec: MethodSpec, questions: list[dict], records: dict[int, dict],
                     reference: dict[int, dict], out: Path) -> None:
    """Label every choice that has no lossless verdict yet against vanilla's choice of the same run
    index (bench/lossless.py), after the method's timed and memory-measured window, and save them."""
    by_id = {q["question_id"]: q for q in questions}
    changed = False
    for qid, record in records.items():
        for choice in record.get("choices", []):
            if "lossless" in choice:
                continue
            if spec.label == "vanilla":
                choice["lossless"] = "identical"
            elif qid in by_id and reference.get(qid, {}).get("choices"):
                vanilla_choices = reference[qid]["choices"]
                vanilla_choice = vanilla_choices[min(choice["index"], len(vanilla_choices) - 1)]
                choice["lossless"] = classify(model, by_id[qid], vanilla_choice, choice)
            else:
                continue
            changed = True
    if changed:
        write_answers(out / "answers" / f"{spec.file_name}.jsonl", records)


_WARNED_POSITIONS: set[tuple] = set()


def warn_past_positions(model: LoadedModel, question: dict, turn: int, prompt_tokens: int, max_new_tokens: int) -> None:
    """Warn once per question and turn when the prompt plus the new tokens exceed the positions the
    model was trained for (MT-bench's turn 2 on a 2,048-position model can)."""
    limit = model.runtime.config.max_positions
    key = (model.alias, question["question_id"], turn)
    if not limit or prompt_tokens + max_new_tokens <= limit or key in _WARNED_POSITIONS:
        return
    _WARNED_POSITIONS.add(key)
    print(f"[run] warning: question {question['question_id']} turn {turn + 1}: {prompt_tokens} prompt tokens + "
          f"{max_new_tokens} new ones exceed {model.alias}'s {limit} positions; tokens past position {limit} are "
          f"outside what the model was trained for (a smaller --max-new-tokens avoids it)", file=sys.stderr)


def settings_from_config(path: str) -> dict:
    """RunSettings fields stored in a run's config.json, to rerun it exactly (`run --config`)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read --config {path}: {error}") from None
    try:
        specs = parse_method_specs(",".join(entry["spec"] for entry in config["methods"].values()))
        defaults: dict[str, dict[str, str]] = {}
        for spec in specs:  # the options a label did not set itself are the same for all labels of its name
            entry = config["methods"][spec.label]
            for key, value in entry["options"].items():
                if key not in spec.options and value is not None:
                    defaults.setdefault(spec.name, {})[key] = str(value).lower() if isinstance(value, bool) else str(value)
        method_args = [f"{name}:" + ",".join(f"{k}={v}" for k, v in pairs.items()) for name, pairs in defaults.items()]
        questions = config["questions"]
        return {"model": config["model"], "methods": ",".join(s.label for s in specs),
                "categories": ",".join(config["categories"]), "limit": config["limit"],
                "max_new_tokens": config["max_new_tokens"], "runs": config["runs"], "device": config["device"],
                "dtype": config["dtype"], "matmul": config["matmul"], "method_args": method_args,
                "temperature": config.get("temperature", 0.0), "seed": config.get("seed", 0),
                "template": config.get("template"), "order": config.get("order", "method"),
                "questions": questions.get("path") if Path(questions.get("path") or "").is_file() else None,
                "questions_sha256": questions["sha256"]}
    except (KeyError, TypeError) as error:
        raise UserError(f"--config {path} lacks the field {error}; it must be a run directory's config.json") from None


def settings_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(RunSettings)]
