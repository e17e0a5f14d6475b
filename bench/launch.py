"""The Ray launcher (`run --launcher ray`): one run's questions spread over a Ray cluster in cells.

A cell is one group of the run's questions, or a shard of a group (`--cells-per-group N`). It holds
one GPU (on CPU, `--cpus-per-cell` cores) and runs vanilla first, then every method, all `--runs`,
over its questions with the local runner's own per-method loop (`bench.runner.run_methods`): every
speedup compares a method with a vanilla measured on the same device, and the lossless check
compares with the cell's own vanilla. Ray places the cells on the cluster's GPUs (or cores) and
retries a cell whose worker died or that raised, `--cell-retries` times; a cell that still fails
is recorded as failed and the rest of the run goes on.

Files, besides what a local run writes into OUT:

    OUT/cells/<cell>/answers/<label>.jsonl   the cell's answers, in the local runner's format
    OUT/cells/<cell>/method_stats.json       the cell's method statuses and overheads
    OUT/cells/<cell>/DONE                    the cell finished: questions, labels, stats, hardware, seconds
    OUT/cells/<cell>/FAILED                  the cell failed after every retry: its error

The driver merges the cells' answers into OUT/answers/<label>.jsonl (sorted by question id) as
cells finish, then writes config.json and method_stats.json as a local run does (the command line
writes the report); the
launcher is recorded in config.json's environment section only, so a local and a Ray run of the
same settings share a config hash and resume each other's directories. A rerun of the same command
skips finished cells and runs failed or missing ones; inside such a cell, questions already
answered (in OUT/answers, or in the cell's own files) are kept. A worker that sees OUT (the driver's
machine, or a shared filesystem) writes each answer into OUT/cells/<cell> as it goes, so even an
attempt that died keeps its finished questions; other workers write into a temporary directory and
hand the cell's answers back to the driver.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.errors import UserError
from bench.device import hardware
from bench.runner import (Plan, RunSettings, build_config, config_hash, load_run_model, model_facts,
                          plan_run, prepare_out_dir, read_answers, resolved_matmul, resumed_matmul, run_methods,
                          write_answers,
                          write_atomic)
from methods.products import pick_matmul_path

FAIL_ENV = "SPEC_BENCH_FAIL_CELL"
INSTALL_HINT = "pip install '.[ray]' in the harness's environment (or `make install`, which installs it)"


@dataclass
class RayOptions:
    address: str | None = None  # None: join the cluster in RAY_ADDRESS, else start one on this machine
    cells_per_group: int = 1
    cpus_per_cell: float = 1.0  # CPU runs only; a GPU cell holds gpus_per_cell GPUs and one core
    cell_retries: int = 2
    gpus_per_cell: int = 1  # >1 with --device-map auto: a model split over the cell's GPUs

    @classmethod
    def from_flags(cls, address: str | None, cells_per_group: int | None, cpus_per_cell: float | None,
                   cell_retries: int | None, gpus_per_cell: int | None = None) -> "RayOptions":
        options = cls(address or None, cells_per_group if cells_per_group is not None else cls.cells_per_group,
                      cpus_per_cell if cpus_per_cell is not None else cls.cpus_per_cell,
                      cell_retries if cell_retries is not None else cls.cell_retries,
                      gpus_per_cell if gpus_per_cell is not None else cls.gpus_per_cell)
        if options.cells_per_group < 1:
            raise UserError("--cells-per-group must be a positive integer")
        if options.cpus_per_cell <= 0:
            raise UserError("--cpus-per-cell must be positive")
        if options.gpus_per_cell < 1:
            raise UserError("--gpus-per-cell must be a positive integer")
        if options.cell_retries < 0:
            raise UserError("--cell-retries must be 0 or more")
        return options


@dataclass(frozen=True)
class Cell:
    cell_id: str  # the group, or GROUP-IofN for the I-th of N shards
    group: str
    question_ids: tuple[int, ...]  # in file order


def plan_cells(questions: list[dict], cells_per_group: int) -> list[Cell]:
    """Split the run's questions into cells: per group (in order of first appearance), up to
    `cells_per_group` contiguous shards of about equal size."""
    by_group: dict[str, list[int]] = {}
    for question in questions:
        by_group.setdefault(question["group"], []).append(question["question_id"])
    cells = []
    for group, ids in by_group.items():
        count = min(cells_per_group, len(ids))
        for index in range(count):
            shard = ids[len(ids) * index // count:len(ids) * (index + 1) // count]
            cell_id = group if count == 1 else f"{group}-{index + 1}of{count}"
            cells.append(Cell(cell_id, group, tuple(shard)))
    return cells


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--launcher ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


# ---- on a worker -------------------------------------------------------------------------------
def inject_failure(hook: str | None, cell_id: str) -> None:
    """Test hook for the retry path. The driver passes the value of $SPEC_BENCH_FAIL_CELL,
    `[exit:]CELL[:MARKER]`: that cell fails before it starts, by raising, or with `exit:` by ending
    its worker process (as a lost worker). With a MARKER path it fails once (the failing attempt
    creates the file, later attempts find it and run); without, every attempt fails."""
    if not hook:
        return
    exit_process = hook.startswith("exit:")
    name, _, marker = hook.removeprefix("exit:").partition(":")
    if name != cell_id:
        return
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if exit_process:
        os._exit(1)
    raise RuntimeError(f"{FAIL_ENV}: injected failure of cell {cell_id}")


def cell_directory(out: Path, run_hash: str, cell_id: str) -> tuple[Path, bool]:
    """OUT/cells/<cell> where this worker sees the run directory (its config.json with this run's
    hash), else a new temporary directory. Returns (directory, is_temporary)."""
    try:
        if json.loads((out / "config.json").read_text()).get("config_hash") == run_hash:
            directory = out / "cells" / cell_id
            (directory / "answers").mkdir(parents=True, exist_ok=True)
            return directory, False
    except (OSError, ValueError):
        pass
    return Path(tempfile.mkdtemp(prefix=f"spec-bench-cell-{cell_id}-")), True


def seed_answers(directory: Path, plan: Plan, seed: dict[str, list[dict]]) -> None:
    """Put answers finished earlier into the cell's answer files, where the file lacks them or
    holds an error, so that the runner skips those questions."""
    (directory / "answers").mkdir(parents=True, exist_ok=True)
    for spec in plan.specs:
        path = directory / "answers" / f"{spec.file_name}.jsonl"
        records = read_answers(path)
        missing = [r for r in seed.get(spec.label, []) if "error" in records.get(r["question_id"], {"error": None})]
        if missing:
            records.update({r["question_id"]: r for r in missing})
            write_answers(path, records)


def probe_model(settings: RunSettings, matmul: str) -> dict:
    """Ray task: load the model as a cell will and pick the matmul path; returns the config fields
    that come from the model, the path and the worker's hardware."""
    try:
        model = load_run_model(settings)
        chosen = pick_matmul_path(model.runtime, matmul)
        return {"facts": model_facts(model), "matmul": chosen, "hardware": hardware()}
    except UserError as error:
        return {"user_error": str(error)}


def run_cell(settings: RunSettings, plan: Plan, cell: Cell, config: dict, out: str, seed: dict[str, list[dict]],
             threads: int | None, fail_hook: str | None) -> dict:
    """Ray task: every method of `plan` (whose questions are this cell's) on this worker's device.
    Returns the cell's answers per label, method stats, checkpoints, hardware and seconds, or
    {"user_error": message} for an error that a retry cannot fix."""
    inject_failure(fail_hook, cell.cell_id)
    directory, temporary = cell_directory(Path(out), config["config_hash"], cell.cell_id)
    try:
        return sweep_cell(settings, plan, cell, config, directory, seed, threads)
    except UserError as error:
        return {"user_error": str(error)}
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)
        gc.collect()  # the worker process may run another cell next: free this one's model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sweep_cell(settings: RunSettings, plan: Plan, cell: Cell, config: dict, directory: Path,
               seed: dict[str, list[dict]], threads: int | None) -> dict:
    started = time.perf_counter()
    seed_answers(directory, plan, seed)
    model = load_run_model(settings)
    path = pick_matmul_path(model.runtime, resolved_matmul(config))
    if threads and model.runtime.device.type == "cpu" and path == "torch":
        torch.set_num_threads(threads)
    cell_config = json.loads(json.dumps(config))
    stats = run_methods(model, plan, plan.questions, settings, directory, cell_config, {})
    answers = {}
    for spec in plan.specs:
        if stats.get(spec.label, {}).get("status") == "ok":
            records = read_answers(directory / "answers" / f"{spec.file_name}.jsonl")
            answers[spec.label] = [records[q] for q in cell.question_ids if q in records]
    methods_run = {label: {key: entry[key] for key in ("checkpoints", "effective_options") if key in entry}
                   for label, entry in cell_config["methods"].items()}
    return {"answers": answers, "stats": stats, "methods": methods_run, "hardware": hardware(),
            "seconds": time.perf_counter() - started}


# ---- on the driver -----------------------------------------------------------------------------
def connect(ray, address: str | None) -> bool:
    """Join the cluster at `address` ("auto": the one started on this machine with `ray start`),
    or start one on this machine. Returns whether this call started the connection."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False)
    except ConnectionError as error:
        raise UserError(f"cannot reach a Ray cluster at {address}: {error}. Start one with `ray start --head` "
                        f"(and `ray start --address=HEAD:6379` on the other machines), then pass "
                        f"--ray-address auto on the head node or --ray-address HEAD:6379") from None
    return True


def _largest_node(ray, resource: str) -> float:
    """The most of `resource` ("GPU", "CPU") that one live node of the cluster has."""
    return max((node.get("Resources", {}).get(resource, 0) for node in ray.nodes() if node.get("Alive")), default=0)


def cell_resources(ray, device: str, cpus_per_cell: float, gpus_per_cell: int = 1) -> tuple[dict, str]:
    """Ray resources of one cell and the device its worker loads the model on: `gpus_per_cell`
    GPUs where the run is on CUDA (`auto` with GPUs in the cluster), else `cpus_per_cell` cores."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" or (device == "auto" and gpus >= 1):
        if gpus < 1:
            raise UserError("--device cuda, but the Ray cluster has no GPU; start its nodes on GPU machines "
                            "or use --device cpu")
        largest = _largest_node(ray, "GPU")
        if gpus_per_cell > largest:
            raise UserError(f"--gpus-per-cell {gpus_per_cell}: no node of the Ray cluster has that many GPUs "
                            f"(the largest has {largest:g}); a cell's GPUs are on one machine")
        return {"num_gpus": gpus_per_cell, "num_cpus": 1}, "cuda"
    largest = _largest_node(ray, "CPU")
    if cpus_per_cell > largest:
        raise UserError(f"--cpus-per-cell {cpus_per_cell:g}: no node of the Ray cluster has that many CPUs "
                        f"(the largest has {largest:g})")
    return {"num_cpus": cpus_per_cell, "num_gpus": 0}, "cpu"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cell_finished(out: Path, cell: Cell, plan: Plan) -> dict | None:
    """The cell's DONE record when it finished these questions for every label of the plan, each
    answer without error (a question that failed is run again, as in a local rerun); else None."""
    directory = out / "cells" / cell.cell_id
    done = read_json(directory / "DONE")
    if not done or done.get("questions") != list(cell.question_ids):
        return None
    if not {s.label for s in plan.specs} <= set(done.get("labels", [])):
        return None
    for spec in plan.specs:
        if done.get("stats", {}).get(spec.label, {}).get("status") != "ok":
            continue
        records = read_answers(directory / "answers" / f"{spec.file_name}.jsonl")
        if any("error" in records.get(q, {"error": None}) for q in cell.question_ids):
            return None
    return done


def cell_seed(out: Path, cell: Cell, plan: Plan) -> dict[str, list[dict]]:
    """Finished answers to the cell's questions that the driver has: the cell's own files, then the
    merged answers (e.g. of an earlier local run of the same settings)."""
    seed = {}
    wanted = set(cell.question_ids)
    for spec in plan.specs:
        merged = read_answers(out / "answers" / f"{spec.file_name}.jsonl")
        own = read_answers(out / "cells" / cell.cell_id / "answers" / f"{spec.file_name}.jsonl")
        records = {q: r for source in (merged, own) for q, r in source.items() if q in wanted and "error" not in r}
        if records:
            seed[spec.label] = [records[q] for q in sorted(records)]
    return seed


def record_cell(out: Path, cell: Cell, plan: Plan, result: dict) -> None:
    """Write a finished cell's answers, stats and DONE mark (the mark last)."""
    directory = out / "cells" / cell.cell_id
    (directory / "answers").mkdir(parents=True, exist_ok=True)
    for spec in plan.specs:
        if spec.label in result["answers"]:
            path = directory / "answers" / f"{spec.file_name}.jsonl"
            records = read_answers(path)
            records.update({r["question_id"]: r for r in result["answers"][spec.label]})
            write_answers(path, records)
    write_atomic(directory / "method_stats.json", json.dumps(result["stats"], indent=2) + "\n")
    done = {"cell": cell.cell_id, "group": cell.group, "questions": list(cell.question_ids),
            "labels": [s.label for s in plan.specs], "stats": result["stats"], "methods": result["methods"],
            "hardware": result["hardware"], "seconds": result["seconds"],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (directory / "FAILED").unlink(missing_ok=True)
    write_atomic(directory / "DONE", json.dumps(done, indent=2) + "\n")


def describe(error: BaseException) -> str:
    """One line for a failed Ray task: the exception the task raised where Ray wraps one (a
    RayTaskError's cause), else Ray's own error (a lost worker, out of memory)."""
    cause = getattr(error, "cause", None)
    shown = cause if isinstance(cause, BaseException) else error
    lines = [line.strip() for line in str(shown).splitlines() if line.strip()]
    return f"{type(shown).__name__}: {lines[0] if lines else ''}"[:500]


def skipped_labels(out: Path, plan: Plan, cells: list[Cell]) -> set[str]:
    """Labels that every finished cell skipped (no checkpoint for the model): they get no answer file."""
    stats = [done.get("stats", {}) for done in (read_json(out / "cells" / c.cell_id / "DONE") for c in cells) if done]
    return {s.label for s in plan.specs
            if stats and all(entry.get(s.label, {}).get("status") == "skipped" for entry in stats)}


def error_record(question: dict, label: str, error: str) -> dict:
    """An answer line for a question that did not run, as the runner writes a failed question."""
    qid = question["question_id"]
    return {"question_id": qid, "category": question["category"], "group": question["group"],
            "answer_id": hashlib.sha1(f"{label}/{qid}".encode()).hexdigest()[:22], "model_id": label,
            "choices": [], "tstamp": time.time(), "error": error}


def merge_cells(out: Path, plan: Plan, cells: list[Cell], failures: dict[str, str], questions: dict[int, dict],
                skipped: set[str]) -> None:
    """Fold the cells' answers into OUT/answers/<label>.jsonl. A finished answer replaces a missing
    or failed one; a question of a failed cell that has no finished answer gets the cell's error."""
    for spec in plan.specs:
        if spec.label in skipped:
            continue
        path = out / "answers" / f"{spec.file_name}.jsonl"
        merged = read_answers(path)
        changed = False
        for cell in cells:
            records = read_answers(out / "cells" / cell.cell_id / "answers" / f"{spec.file_name}.jsonl")
            for qid in cell.question_ids:
                new, old = records.get(qid), merged.get(qid)
                old_failed = old is None or "error" in old
                if new is not None and (old_failed or "error" not in new):
                    replacement = new
                elif old_failed and cell.cell_id in failures:
                    replacement = error_record(questions[qid], spec.label,
                                               f"cell {cell.cell_id} failed: {failures[cell.cell_id]}")
                    if old is not None and old.get("error") == replacement["error"]:
                        continue
                else:
                    continue
                if replacement != old:
                    merged[qid] = replacement
                    changed = True
        if changed:
            write_answers(path, merged)


def merge_stats(out: Path, plan: Plan, cells: list[Cell], config: dict) -> None:
    """method_stats.json and each label's checkpoints and effective options from the finished cells:
    a method is ok where any cell ran it; memory figures are the largest over cells."""
    stats_path = out / "method_stats.json"
    stats = read_json(stats_path) or {}
    dones = [done for done in (read_json(out / "cells" / c.cell_id / "DONE") for c in cells) if done]
    for spec in plan.specs:
        entries = [done["stats"][spec.label] for done in dones if spec.label in done.get("stats", {})]
        ok = [entry for entry in entries if entry.get("status") == "ok"]
        if ok:
            peaks = [entry["peak_memory_bytes"] for entry in ok if entry.get("peak_memory_bytes") is not None]
            stats[spec.label] = {"name": spec.name, "status": "ok", "reason": None,
                                 "trained_params": ok[0]["trained_params"],
                                 "extra_memory_bytes": max(entry["extra_memory_bytes"] for entry in ok),
                                 "peak_memory_bytes": max(peaks) if peaks else None}
        elif entries:
            stats[spec.label] = entries[0]
        loaded = [done["methods"][spec.label] for done in dones
                  if done.get("stats", {}).get(spec.label, {}).get("status") == "ok"
                  and spec.label in done.get("methods", {})]
        if loaded:
            hashes = {json.dumps(sorted((entry.get("checkpoints") or {}).values())) for entry in loaded}
            if len(hashes) > 1:
                print(f"[ray] warning: the cells loaded different checkpoint files for {spec.label} "
                      f"(see OUT/cells/*/DONE); the workers' copies of the checkpoints differ", file=sys.stderr)
            config["methods"][spec.label].update(loaded[0])
    write_atomic(stats_path, json.dumps(stats, indent=2) + "\n")


def run_on_ray(settings: RunSettings, options: RayOptions) -> Path:
    """Run (or resume) a sweep on a Ray cluster, cell by cell, into one run directory, as a local run
    does. Returns the run directory."""
    ray = import_ray()
    if settings.device.startswith("cuda:"):
        raise UserError("with --launcher ray, Ray assigns each cell its GPU: use --device cuda or auto")
    plan = plan_run(settings)
    cells = plan_cells(plan.questions, options.cells_per_group)
    started_here = connect(ray, options.address)
    try:
        return sweep(ray, settings, options, plan, cells)
    finally:
        if started_here:
            ray.shutdown()


def sweep(ray, settings: RunSettings, options: RayOptions, plan: Plan, cells: list[Cell]) -> Path:
    resources, device = cell_resources(ray, settings.device, options.cpus_per_cell, options.gpus_per_cell)
    settings = dataclasses.replace(settings, device=device)
    out = Path(settings.out or Path("runs") / settings.model)
    retry = {"max_retries": options.cell_retries, "retry_exceptions": True}
    try:
        probe = ray.get(ray.remote(probe_model).options(**resources, **retry)
                        .remote(settings, resumed_matmul(out, settings.matmul)))
    except ray.exceptions.RayError as error:
        raise UserError(f"no Ray worker could load {settings.model}: {describe(error)}") from None
    if "user_error" in probe:
        raise UserError(probe["user_error"])
    launcher = {"launcher": "ray", "ray": {
        "version": ray.__version__, "address": options.address or "local",
        "cells_per_group": options.cells_per_group, "cell_resources": resources, "cell_retries": options.cell_retries}}
    config = build_config(probe["facts"], probe["matmul"], plan, settings, launcher)
    config["environment"]["hardware"] = probe["hardware"]  # a worker's, where the driver may have no GPU
    config = prepare_out_dir(out, config)

    todo = [cell for cell in cells if cell_finished(out, cell, plan) is None]
    held = f"{resources['num_gpus']} GPU(s)" if resources["num_gpus"] else f"{resources['num_cpus']:g} CPU core(s)"
    print(f"[ray] {len(plan.questions)} questions in {len(cells)} cells ({len(cells) - len(todo)} finished "
          f"earlier), each holding {held}, on {config['device']}/{config['dtype']}; writing {out}", file=sys.stderr)
    by_id = {q["question_id"]: q for q in plan.questions}
    threads = max(1, int(options.cpus_per_cell)) if device == "cpu" else None
    fail_hook = os.environ.get(FAIL_ENV)
    remote_cell = ray.remote(run_cell)
    pending = {}
    for cell in todo:
        cell_plan = dataclasses.replace(plan, questions=[by_id[q] for q in cell.question_ids])
        reference = remote_cell.options(**resources, **retry, name=f"cell {cell.cell_id}").remote(
            settings, cell_plan, cell, config, str(out.resolve()), cell_seed(out, cell, plan), threads, fail_hook)
        pending[reference] = cell
    failures: dict[str, str] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as error:  # the task raised, or its worker died, on every attempt
                failures[cell.cell_id] = describe(error)
                directory = out / "cells" / cell.cell_id
                directory.mkdir(parents=True, exist_ok=True)
                write_atomic(directory / "FAILED", json.dumps(
                    {"cell": cell.cell_id, "error": failures[cell.cell_id], "retries": options.cell_retries,
                     "failed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
                print(f"[ray] cell {cell.cell_id} failed after {options.cell_retries} retries: "
                      f"{failures[cell.cell_id]}", file=sys.stderr)
            else:
                if "user_error" in result:
                    raise UserError(f"cell {cell.cell_id}: {result['user_error']}")
                record_cell(out, cell, plan, result)
                print(f"[ray] cell {cell.cell_id} done: {len(cell.question_ids)} question(s) in "
                      f"{result['seconds']:.0f} s on {result['hardware'].get('name')}; {len(pending)} to go",
                      file=sys.stderr)
            merge_cells(out, plan, [cell], failures, by_id, skipped_labels(out, plan, cells))
    finally:
        for reference in pending:  # interrupted, or a user error: stop the cells still running
            ray.cancel(reference, force=True)
    merge_cells(out, plan, cells, failures, by_id, skipped_labels(out, plan, cells))
    merge_stats(out, plan, cells, config)
    config["config_hash"] = config_hash(config)
    write_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    if failures:
        listed = "; ".join(f"{cell_id} ({message})" for cell_id, message in failures.items())
        print(f"[ray] {len(failures)} cell(s) failed after {options.cell_retries} retries: {listed}. Their questions "
              f"are recorded with the error; rerun the same command to retry them.", file=sys.stderr)
    return out
