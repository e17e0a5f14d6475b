"""Command line: python -m bench {list,run,report} ... (see --help of each)."""
from __future__ import annotations

import argparse
import importlib.util
import sys

from bench.errors import UserError

EPILOG = """examples:
  python -m bench list
  python -m bench run --model gemma-3-270m --limit 2 --max-new-tokens 64
  python -m bench run --model vicuna-7b --methods vanilla,kangaroo,kangaroo+draft_vocab=32768 --out runs/v7b
  python -m bench report runs/v7b
  python -m bench compare results/regress runs/regress    # exit 1 when something regressed
  python -m bench profile --model gemma-3-270m --out runs/profile
"""


def build_parser() -> argparse.ArgumentParser:
    import methods
    parser = argparse.ArgumentParser(prog="python -m bench", description="Spec-Bench harness for speculative decoding.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("list", help="methods and their options, models, category groups")

    run = commands.add_parser("run", help="run (or resume) a sweep into a run directory, then report it",
                              description="Run every method over the chosen Spec-Bench questions. vanilla always "
                              "runs (added when not listed). A rerun into the same --out resumes, skipping finished "
                              "questions; flags left out take their value from --config when given.")
    run.add_argument("--model", help="catalog alias (see `list`), HF hub id or local folder [gemma-3-270m]")
    run.add_argument("--methods", help="comma-separated specs NAME or NAME+key=value+...; default: every shipped "
                     "method, skipping those without a checkpoint for the model")
    run.add_argument("--categories", help="groups or file categories, comma-separated: mt_bench, translation, "
                     "summarization, qa, math_reasoning, rag, all [all]")
    run.add_argument("--limit", type=int, help="questions per group (mt_bench round-robin over its 8 categories) [all]")
    run.add_argument("--max-new-tokens", type=int, help="new tokens per turn [1024]")
    run.add_argument("--runs", type=int, help="generate every question R times, stored as choices[0..R-1] [1]")
    run.add_argument("--questions", help="question.jsonl to use (else $SPEC_BENCH_QUESTIONS, else the pinned "
                     "Spec-Bench file, downloaded once into the cache)")
    run.add_argument("--out", help="run directory [runs/MODEL]")
    run.add_argument("--config", help="a run's config.json: rerun it with the same settings")
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N [auto]")
    run.add_argument("--dtype", help="auto, float32, float16, bfloat16 or float64 [auto: float32 on CPU; "
                     "float16 on CUDA, bfloat16 for Gemma3]")
    run.add_argument("--matmul", help="matrix-product path on CPU: torch; blas (numpy/OpenBLAS on transposed weights); kernel (the "
                     "harness's skinny AVX2 product for up to 32 rows, compiled once with the system C compiler; "
                     "k-row products bit-identical to 1-row ones); auto (the fastest of kernel, torch and blas for "
                     "one row of the LM head, measured at load) [auto]")
    run.add_argument("--method-args", nargs="+", metavar="NAME:key=value,...",
                     help="default options for every spec of NAME")
    run.add_argument("--template", help="chat template for a model outside the catalog: question_answer or vicuna_v1.1")
    run.add_argument("--temperature", type=float, help="0: greedy decoding; above: sample from softmax(logits / T), "
                     "every speculative method with a rule that keeps that distribution exactly (medusa+accept=typical "
                     "excepted) [0]")
    run.add_argument("--seed", type=int, help="at temperature > 0, with the question id, run index and turn, the "
                     "seed of each turn's generator: reruns, resumed and Ray runs draw the same samples [0]")
    run.add_argument("--order", choices=["method", "question"],
                     help="method: each method over every question, then the next method (Spec-Bench's order); "
                     "question: every method on a question before the next question, so each method is timed "
                     "seconds after vanilla on the same prompt and its speedup stays paired on a host whose "
                     "speed drifts (shared cores, changing memory bandwidth); all methods are held at once "
                     "[method]")
    run.add_argument("--no-report", action="store_true", help="skip writing the summary and figures")
    run.add_argument("--device-map", choices=["auto", "none"],
                     help="auto: a hub/local checkpoint's decoder layers are spread over the visible GPUs (as "
                     "few as hold it, from --device's on; embedding, final norm and LM head on the first) and run "
                     "as a pipeline, each layer's KV cache on its GPU; on CPU it is the plain load [none]")
    launcher = run.add_argument_group(
        "launcher", "Where the sweep runs. ray: the questions are split into cells (one group, or a shard of a "
        "group's questions); each cell holds one GPU (--gpus-per-cell GPUs; on CPU, --cpus-per-cell cores) and runs vanilla and every "
        "method, all --runs, on that device. Results land in --out as a local run writes them; a rerun skips "
        "finished cells and retries failed or missing ones.")
    launcher.add_argument("--launcher", choices=["local", "ray"], default="local",
                          help="local: one process, sequential; ray: cells on a Ray cluster (pip install "
                          "'.[ray]') [local]")
    launcher.add_argument("--ray-address", help="ray: the cluster to join, e.g. auto (the one started on this "
                          "machine with `ray start --head`) or HEAD:6379 [RAY_ADDRESS, else a new cluster on "
                          "this machine]")
    launcher.add_argument("--cells-per-group", type=int,
                          help="ray: split each group's questions into N cells to use more GPUs [1]")
    launcher.add_argument("--cpus-per-cell", type=float, help="ray, on CPU: cores each cell holds [1]")
    launcher.add_argument("--gpus-per-cell", type=int, help="ray, on GPUs: GPUs each cell holds, for a model "
                          "larger than one GPU with --device-map auto [1]")
    launcher.add_argument("--cell-retries", type=int, help="ray: retries of a cell whose worker died or that "
                          "raised, before it is recorded as failed [2]")

    trainable = list(methods.trainable())
    train = commands.add_parser("train", help=f"train a drafter ({', '.join(trainable)}) for a model",
                                description="Freeze the model, precompute its features on ShareGPT conversations "
                                "(or, with --data, on the model's own answers from `distill-data`) and distil the "
                                "drafter with the method's own training; saves a checkpoint folder (safetensors + "
                                "config.json with provenance) and tunes its defaults. Runs within --minutes; --resume "
                                "continues from a checkpoint.")
    train.add_argument("--model", default="gemma-3-270m", help="catalog alias or HF id [gemma-3-270m]")
    train.add_argument("--method", required=True, choices=trainable)
    train.add_argument("--data", help="a `distill-data` folder: train on the model's own answers [ShareGPT text]")
    train.add_argument("--set", nargs="+", metavar="KEY=VALUE",
                       help="the method's training options: " + "; ".join(
                           f"{name}: " + ", ".join(f"{k}={o.default} ({o.help})" for k, o in m.train_options.items())
                           for name, m in methods.trainable().items() if getattr(m, "train_options", None)))
    train.add_argument("--out", help="checkpoint folder [methods/checkpoints/MODEL/METHOD]")
    train.add_argument("--resume", help="checkpoint folder to continue from")
    train.add_argument("--minutes", type=float, default=50, help="wall-clock budget of the training loop [50]")
    train.add_argument("--tokens", type=int, default=150_000, help="assistant tokens of ShareGPT to train on [150000]")
    train.add_argument("--epochs", type=float, default=8, help="at most this many passes over the tokens [8]")
    train.add_argument("--lr", type=float, help="peak learning rate [the method's own]")
    train.add_argument("--candidates", type=int, default=32768,
                       help="distil over the N most frequent tokens [32768]")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-tune", action="store_true", help="skip timing the tuning grid after training (tune "
                       "later with `bench tune`, on a quiet machine: it measures speed)")
    train.add_argument("--device", default="auto")
    train.add_argument("--dtype", default="float32", help="float32 (default: the drafter trains in full precision)")

    distill = commands.add_parser(
        "distill-data", help="the model's own greedy answers to ShareGPT first turns (drafter training data)",
        description="Answers ShareGPT first turns in the model's template greedily, in batches of equal-length "
        "prompts, and appends them to OUT/answers.jsonl.gz with OUT/provenance.json. Prompts sharing an 8-word "
        "n-gram with a Spec-Bench turn are excluded (and recorded). Resumable: rerun the same command to continue.")
    distill.add_argument("--model", default="gemma-3-270m", help="catalog alias or HF id [gemma-3-270m]")
    distill.add_argument("--out", required=True, help="output folder (created; an existing one is continued)")
    distill.add_argument("--conversations", type=int, default=8000, help="conversations to answer in all [8000]")
    distill.add_argument("--max-new-tokens", type=int, default=192, help="new tokens per answer at most [192]")
    distill.add_argument("--minutes", type=float, help="stop this job after N minutes (rerun to continue)")
    distill.add_argument("--batch", type=int, default=32, help="prompts decoded together [32]")
    distill.add_argument("--questions", help="Spec-Bench question.jsonl whose turns are excluded [the pinned file]")
    distill.add_argument("--device", default="auto")
    distill.add_argument("--dtype", default="auto")
    distill.add_argument("--matmul", default="auto", help="CPU product path (auto: the fastest for --batch rows)")

    tune = commands.add_parser("tune", help="pick a drafter checkpoint's default options by measured throughput",
                               description="Decodes held-out ShareGPT prompts with vanilla and each option variant "
                               "(Medusa: trees; Kangaroo: threshold x steps x draft vocabulary, and with --variant tree: "
                               "threshold x steps x top_k x total_tokens; EAGLE-2: depth x top_k x total_tokens), each "
                               "right after a vanilla run on the same prompts, and records the one with the best "
                               "speedup as the checkpoint's recommended defaults, with the table, in its config.json. "
                               "Run it on a quiet machine: it measures speed.")
    tune.add_argument("--model", default="gemma-3-270m")
    tune.add_argument("--method", required=True, choices=[n for n, m in methods.available().items() if m.tuning_grid])
    tune.add_argument("--checkpoint", help="checkpoint folder [methods/checkpoints/MODEL/METHOD]")
    tune.add_argument("--variant", help="tune a variant apart, with its option on (kangaroo: tree); its best is "
                      "stored as recommended[VARIANT] and used only with that option on [the method itself]")
    tune.add_argument("--device", default="auto")
    tune.add_argument("--dtype", default="auto")

    profile = commands.add_parser("profile", help="time one step of each method and the verify-cost curve",
                                  description="Times a forward over k = 1..64 new tokens at a few context lengths, "
                                  "the LM head alone, Kangaroo's draft step and verification, and PLD's lookup; "
                                  "writes DIR/profile.csv (component,k,context,ms_min,ms_median).")
    profile.add_argument("--model", default="gemma-3-270m")
    profile.add_argument("--out", help="directory for profile.csv [runs/MODEL-profile]; a run directory works")
    profile.add_argument("--device", default="auto")
    profile.add_argument("--dtype", default="auto")
    profile.add_argument("--matmul", default="auto", help="auto, torch, blas or kernel [auto]")

    compare = commands.add_parser(
        "compare", help="compare two runs: exit 1 when a method got slower or less accurate",
        description="Compares BASELINE and NEW (run directories or summary.csv files) per (method, category): "
        "mean accepted tokens (must not fall beyond the tau tolerance), the lossless fraction (must not fall), "
        "diverged questions (must not appear) and speedup (must not fall beyond the speedup tolerance; "
        "enforced with --strict or when both runs name the same hardware, else a warning). Runs with different "
        "configs are listed and not compared. Exit 0: no regression; 1: a regression; 2: unusable input.")
    compare.add_argument("baseline", help="run directory or summary.csv of the reference")
    compare.add_argument("new", help="run directory or summary.csv to check")
    compare.add_argument("--tolerance", help="relative tolerances, e.g. tau=0.01,speedup=0.10 [the defaults]")
    compare.add_argument("--strict", action="store_true", help="enforce speedup even across different hardware")
    compare.add_argument("--ignore-config", action="store_true",
                         help="compare even when the configs differ (the differences are printed)")
    compare.add_argument("--speedup-min-questions", type=int, default=1, metavar="N",
                         help="enforce speedup only on rows measured on at least N questions; smaller rows "
                         "(one question of a category) are warned about [1: every row]")

    gpu = commands.add_parser(
        "gpu-check", help="self-test on a GPU box: lossless suite in float16/bfloat16, rounding, 7B step costs",
        description="Runs on the system's own torch and transformers (no install, no download): the lossless "
        "suite of every method on the tiny models of every family in float16 and bfloat16 (planted bugs must be "
        "caught), the k-row vs one-row rounding against the near-tie tolerance, and the step-cost profile of a "
        "random-weight vicuna-7b-shaped model in float16 against the HBM floor. Writes DIR/gpu_check.md. "
        "Exit 0: passed (or no GPU, which it says); 1: a check failed; 2: a GPU that torch cannot use.")
    gpu.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run on the tiny models [cuda]")
    gpu.add_argument("--out", help="report directory [runs/gpu-check]")
    gpu.add_argument("--prompts", type=int, default=10, help="prompts per model in the lossless suite (planted "
                     "bugs must be caught on 90%% of them) [10]")
    gpu.add_argument("--families", default="llama,qwen2,gemma3", help="tiny model families to check [all three]")
    gpu.add_argument("--new-tokens", type=int, default=32, help="new tokens per prompt [32]")
    gpu.add_argument("--no-profile", action="store_true", help="skip the step-cost profile")

    report = commands.add_parser("report", help="write summary.csv/.md/.tex and figures/ for a run directory")
    report.add_argument("run_dir")
    return parser


def command_list() -> None:
    import methods
    from bench import data
    from bench.models import CATALOG
    print("methods (use NAME or NAME+key=value in --methods):")
    for name, method in methods.available().items():
        print(f"  {name:14} {method.description}")
        for key, option in method.options.items():
            print(f"      {key}={option.default!s:10} ({option.type.__name__}) {option.help}")
    print("\nmodels (--model):")
    for alias, spec in CATALOG.items():
        print(f"  {alias:20} {spec.description} [{spec.source}]")
    print("\ngroups (--categories; file categories work too):")
    for group, categories in data.GROUPS.items():
        print(f"  {group:16} {', '.join(categories)}")


def command_run(args: argparse.Namespace) -> None:
    from bench.runner import RunSettings, run, settings_from_config
    values = settings_from_config(args.config) if args.config else {}
    for name in ("model", "methods", "categories", "limit", "max_new_tokens", "runs", "questions", "out",
                 "device", "dtype", "matmul", "method_args", "template", "temperature", "seed", "order"):
        given = getattr(args, name)
        if given is not None:
            values[name] = given
    if args.device_map is not None:
        values["device_map"] = args.device_map
    ray_flags = {"--ray-address": args.ray_address, "--cells-per-group": args.cells_per_group,
                 "--cpus-per-cell": args.cpus_per_cell, "--cell-retries": args.cell_retries,
                 "--gpus-per-cell": args.gpus_per_cell}
    if args.launcher == "ray":
        from bench.launch import RayOptions, run_on_ray
        out = run_on_ray(RunSettings(**values), RayOptions.from_flags(*ray_flags.values()))
    else:
        given = [flag for flag, value in ray_flags.items() if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply to --launcher ray")
        out = run(RunSettings(**values))
    if not args.no_report:
        from bench.report import write_report
        write_report(out)
    print(f"done: {out}")
    summary = out / "summary.md"
    if summary.exists():
        print(summary.read_text())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            command_list()
        elif args.command == "run":
            command_run(args)
        elif args.command == "train":
            from bench.training import train_command
            train_command(args)
        elif args.command == "distill-data":
            from pathlib import Path

            from bench import data
            from bench.distill import distill
            from bench.models import load_model
            from methods.products import pick_matmul_path
            if args.conversations <= 0 or args.max_new_tokens <= 0 or args.batch <= 0:
                raise UserError("--conversations, --max-new-tokens and --batch must be positive")
            questions_file, _ = data.questions_path(args.questions)
            model = load_model(args.model, args.device, args.dtype)
            path = pick_matmul_path(model.runtime, args.matmul, rows=args.batch)
            print(f"[distill] {model.alias} on {model.runtime.device.type}/{model.runtime.dtype}, matmul {path}",
                  file=sys.stderr)
            provenance = distill(model, Path(args.out), args.conversations, args.max_new_tokens, args.minutes,
                                 Path(questions_file), args.batch)
            print(f"{args.out}: {provenance.get('conversations', 0)} conversations, {provenance.get('tokens', 0)} "
                  f"tokens generated")
        elif args.command == "tune":
            from pathlib import Path

            from bench.models import load_model
            from bench.training import default_checkpoint_folder, tune
            model = load_model(args.model, args.device, args.dtype)
            folder = Path(args.checkpoint) if args.checkpoint else default_checkpoint_folder(model.alias, args.method)
            config = tune(model, args.method, folder, variant=args.variant)
            recommended = config["recommended"]
            print(f"recommended for {folder}: {recommended.get(args.variant) if args.variant else recommended}")
        elif args.command == "profile":
            from pathlib import Path

            from bench.models import load_model
            from bench.profile import write_profile
            from methods.products import pick_matmul_path
            model = load_model(args.model, args.device, args.dtype)
            path = pick_matmul_path(model.runtime, args.matmul)
            print(f"[profile] {model.alias} on {model.runtime.device.type}/{model.runtime.dtype}, matmul {path}",
                  file=sys.stderr)
            print(write_profile(model, Path(args.out or f"runs/{model.alias}-profile")))
        elif args.command == "gpu-check":
            missing = [name for name in ("torch", "transformers", "numpy") if importlib.util.find_spec(name) is None]
            if missing:
                raise UserError(f"gpu-check runs on this python's own packages ({sys.executable}), which lacks "
                                f"{', '.join(missing)}: run it with the python that has torch and transformers "
                                f"(make gpu-check PYTHON_SYSTEM=/path/to/python), or with .venv/bin/python")
            from bench.gpu_check import gpu_check
            return gpu_check(args.device, args.out, args.prompts, args.new_tokens, not args.no_profile,
                             [f.strip() for f in args.families.split(",") if f.strip()])
        elif args.command == "compare":
            from bench.compare import compare_command
            return compare_command(args.baseline, args.new, args.tolerance, args.strict, args.ignore_config,
                                   speedup_min_questions=args.speedup_min_questions)
        elif args.command == "report":
            from bench.report import write_report
            write_report(args.run_dir)
            print((__import__("pathlib").Path(args.run_dir) / "summary.md").read_text())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished questions are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
