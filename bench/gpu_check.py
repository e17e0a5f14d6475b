"""`python -m bench gpu-check`: a self-test for a GPU box, in a few minutes, downloading nothing.

It runs on the system's own torch and transformers from a plain checkout (no virtualenv, no
install; GPU boxes on shared clusters are often offline with their own torch), and checks what a
GPU run's numbers depend on:

1. the lossless suite (bench/selftest.py) on the tiny models of every family, random and peaked,
   in float16 and bfloat16 on the device, for every registered method: no correct method may be
   `diverged`, and planted bugs must be `diverged` on at least 90% of prompts;
2. how far a k-row forward's logits are from one-row forwards in each dtype, in units of
   eps·max(1, |top-1 logit|), against the near-tie tolerance's C_HALF (bench/lossless.py);
3. the step-cost profile of a random-weight model with vicuna-7b's shape in float16 against the
   HBM floor (bench/profile.py), on a GPU; the CPU dry run profiles the tiny Llama instead.

Writes DIR/gpu_check.md (the report), DIR/gpu_check.json and DIR/profile.csv. Exit status: 0 when
every check passed (or there is no GPU, which it says), 1 when a check failed, 2 when nvidia-smi
sees a GPU that torch cannot use.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from bench import lossless
from bench.errors import UserError
from bench.selftest import PLANTED_BUGS, lossless_suite, planted_bug_labels
from bench.tiny import TINY_FAMILIES, synthetic_prompts

HALF_DTYPES = ("float16", "bfloat16")
MIN_BUG_RATE = 0.9
VICUNA_7B_SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                       rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def _log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


@torch.inference_mode()
def rounding_units(runtime, prompts: list[list[int]], new_tokens: int = 24, chunks=(2, 4, 8)) -> float:
    """The largest |logit difference| between a forward over k tokens and k one-token forwards of
    the same text (vanilla's own continuation of each prompt), in units of eps(dtype)·max(1, |top-1|)."""
    import methods
    eps = torch.finfo(runtime.dtype).eps
    vanilla = methods.get("vanilla")(runtime)
    worst = 0.0
    for prompt in prompts:
        sequence = prompt + vanilla.generate(prompt, new_tokens, []).new_ids
        tokens = torch.tensor([sequence], device=runtime.device)
        start = len(prompt) - 1
        one_cache = runtime.new_cache(len(sequence))
        runtime.forward(tokens[:, :start], one_cache, 0)
        one_row = torch.cat([runtime.forward(tokens[:, i:i + 1], one_cache, i)[0]
                             for i in range(start, len(sequence))]).double()  # [n, V]
        scale = eps * one_row.max(dim=-1).values.abs().clamp(min=1.0)
        for k in chunks:
            cache = runtime.new_cache(len(sequence))
            runtime.forward(tokens[:, :start], cache, 0)
            many = torch.cat([runtime.forward(tokens[:, i:i + k], cache, i)[0]
                              for i in range(start, len(sequence), k)]).double()
            worst = max(worst, float(((many - one_row).abs().max(dim=-1).values / scale).max()))
    return worst


def lossless_section(device: str, prompts: int, new_tokens: int,
                     families=TINY_FAMILIES) -> tuple[list[dict], list[dict], list[dict]]:
    """(suite rows, planted-bug rows, rounding rows) over the tiny models of `families` in each half dtype."""
    from bench.models import load_model
    suite, bugs, rounding = [], [], []
    texts = synthetic_prompts(prompts)
    for family in families:
        for dtype in HALF_DTYPES:
            for kind in ("peaked", "random"):
                started = time.perf_counter()
                model = load_model(f"tiny-{family}-{kind}", device=device, dtype=dtype)
                runtime = model.runtime
                result = lossless_suite(runtime, texts, new_tokens)
                for label, verdicts in result.verdicts.items():
                    suite.append({"family": family, "dtype": dtype, "model": kind, "method": label,
                                  **{v: verdicts.count(v) for v in ("identical", "near_tie", "diverged")}})
                for label, reason in result.skipped.items():
                    suite.append({"family": family, "dtype": dtype, "model": kind, "method": label,
                                  "skipped": reason})
                if kind == "peaked":
                    for bug in PLANTED_BUGS:
                        planted = lossless_suite(runtime, texts, new_tokens, labels=planted_bug_labels(), bug=bug)
                        for label, verdicts in planted.verdicts.items():
                            bugs.append({"family": family, "dtype": dtype, "bug": bug, "method": label,
                                         "diverged": verdicts.count("diverged"), "prompts": len(verdicts)})
                    rounding.append({"family": family, "dtype": dtype, "units": round(rounding_units(runtime, texts), 3)})
                _log(f"tiny-{family}-{kind} {dtype}: {time.perf_counter() - started:.1f} s")
                del model
    return suite, bugs, rounding


def profile_model(device: str):
    """(model for bench.profile, its description): a random-weight vicuna-7b-shaped Llama in float16
    on a GPU; the tiny Llama on the CPU (the dry run)."""
    from bench.models import LoadedModel, load_model, runtime_from_hf
    from bench.tiny import ByteTokenizer
    if device == "cpu":
        return load_model("tiny-llama-random", device="cpu", dtype="float32"), "tiny-llama-random, float32 (dry run)"
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(**VICUNA_7B_SHAPE, initializer_range=0.02)
    with torch.device(device):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    runtime = runtime_from_hf(hf_model)  # alias None: untrained drafters are allowed for its profile
    model = LoadedModel("vicuna-7b-shape-random", "random", "llama", "vicuna_v1.1", runtime, ByteTokenizer())
    return model, "random weights, vicuna-7b's shape (32 layers, hidden 4096, vocab 32000), float16"


def profile_section(device: str, out: Path) -> dict:
    from bench.profile import floor_ratios, profile_rows, write_rows
    from methods.products import pick_matmul_path
    model, description = profile_model(device)
    pick_matmul_path(model.runtime, "torch")
    if device == "cpu":  # the dry run: every code path, small sizes
        rows, summary = profile_rows(model, k_values=(1, 2, 4), contexts=(32,), repeats=2, stream_bytes=1 << 26)
    else:
        rows, summary = profile_rows(model, repeats=5)
    write_rows(rows, out / "profile.csv")
    ratios = floor_ratios(rows)
    forwards = [{"k": r["k"], "context": r["context"], "ms": r["ms_min"], "floor_ms": None, "ratio": None}
                for r in rows if r["component"] == "forward"]
    floors = {(r["k"], r["context"]): r["ms_min"] for r in rows if r["component"] == "floor"}
    for row in forwards:
        row["floor_ms"] = floors.get((row["k"], row["context"]))
        row["ratio"] = round(ratios.get((row["k"], row["context"]), float("nan")), 2)
    others = [r for r in rows if r["component"] not in ("forward", "floor")]
    return {"model": description, "bandwidth_gb_s": round(summary["bandwidth_bytes_per_s"] / 1e9, 1),
            "peak_tflop_s": round(summary["peak_flops_per_s"] / 1e12, 2), "forward": forwards, "components": others}


def failures(report: dict) -> list[str]:
    """What failed, in words (empty when everything passed)."""
    found = []
    for row in report["lossless"]:
        if row.get("diverged"):
            found.append(f"{row['method']} diverged on {row['diverged']} prompt(s): tiny-{row['family']}-{row['model']} "
                         f"{row['dtype']}")
    for row in report["planted_bugs"]:
        if row["diverged"] < MIN_BUG_RATE * row["prompts"]:
            found.append(f"planted bug {row['bug']} in {row['method']} diverged on only {row['diverged']} of "
                         f"{row['prompts']} prompts (tiny-{row['family']}-peaked {row['dtype']})")
    for row in report["rounding"]:
        if row["units"] > lossless.C_HALF / 2:
            found.append(f"k-row vs one-row logits differ by {row['units']} eps·|top-1| on tiny-{row['family']} "
                         f"{row['dtype']}, more than half the near-tie tolerance (C_HALF = {lossless.C_HALF})")
    return found


def environment(device: str) -> dict:
    import platform

    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "device": device}
    if device != "cpu":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_markdown(report: dict, path: Path) -> None:
    env = report["environment"]
    lines = [f"# gpu-check on {env.get('gpu', 'cpu (dry run)')}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, python {env['python']}; "
             f"{report['seconds']:.0f} s. Verdict: **{'PASS' if not report['failures'] else 'FAIL'}**", ""]
    lines += [f"- {failure}" for failure in report["failures"]] + [""] * bool(report["failures"])
    lines += [f"## Lossless suite ({report['prompts']} prompts x {report['new_tokens']} new tokens, greedy)", "",
              "Every method against vanilla on the tiny models; a correct method is never `diverged`.", "",
              "| model | dtype | method | identical | near_tie | diverged |", "|---|---|---|---|---|---|"]
    for row in report["lossless"]:
        cells = ("skipped: " + row["skipped"][:60], "", "") if "skipped" in row else \
            (row["identical"], row["near_tie"], row["diverged"])
        lines.append(f"| tiny-{row['family']}-{row['model']} | {row['dtype']} | {row['method']} | "
                     + " | ".join(map(str, cells)) + " |")
    lines += ["", f"## Planted bugs (must be `diverged` on at least {MIN_BUG_RATE:.0%} of prompts)", "",
              "| model | dtype | bug | method | diverged |", "|---|---|---|---|---|"]
    lines += [f"| tiny-{r['family']}-peaked | {r['dtype']} | {r['bug']} | {r['method']} | {r['diverged']}/{r['prompts']} |"
              for r in report["planted_bugs"]]
    lines += ["", "## Rounding: k-row vs one-row forwards", "",
              f"Largest |logit difference| in units of eps·max(1, |top-1|); the near-tie tolerance is "
              f"{lossless.C_HALF} units (checked: at most half of it).", "", "| model | dtype | units |", "|---|---|---|"]
    lines += [f"| tiny-{r['family']}-peaked | {r['dtype']} | {r['units']} |" for r in report["rounding"]]
    profile = report.get("profile")
    if profile:
        lines += ["", f"## Step costs: {profile['model']}", "",
                  f"Read bandwidth {profile['bandwidth_gb_s']} GB/s, peak {profile['peak_tflop_s']} TFLOP/s "
                  f"(measured). A forward over k new tokens, best of 5:", "",
                  "| k | context | ms | floor ms | ÷ floor |", "|---|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['context']} | {r['ms']:.2f} | {r['floor_ms']:.2f} | {r['ratio']} |"
                  for r in profile["forward"]]
        lines += ["", "| component | k | context | ms |", "|---|---|---|---|"]
        lines += [f"| {r['component']} | {r['k']} | {r['context']} | {r['ms_min']:.2f} |" for r in profile["components"]]
    path.write_text("\n".join(lines) + "\n")


def gpu_check(device: str = "cuda", out: Path | None = None, prompts: int = 10, new_tokens: int = 32,
              profile: bool = True, families=TINY_FAMILIES) -> int:
    from bench.device import unusable_gpu_problem
    problem = unusable_gpu_problem()
    if device != "cpu" and problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if device != "cpu" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible here (torch.cuda.is_available() is False); nothing to check. "
              "`python -m bench gpu-check --device cpu` runs the CPU dry run.", file=sys.stderr)
        return 0
    out = Path(out or "runs/gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    unknown = sorted(set(families) - set(TINY_FAMILIES))
    if unknown:
        raise UserError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; valid: "
                        f"{', '.join(TINY_FAMILIES)}")
    suite, bugs, rounding = lossless_section(device, prompts, new_tokens, families)
    report = {"environment": environment(device), "prompts": prompts, "new_tokens": new_tokens,
              "lossless": suite, "planted_bugs": bugs, "rounding": rounding}
    if profile:
        report["profile"] = profile_section(device, out)
    report["seconds"] = time.perf_counter() - started
    report["failures"] = failures(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "gpu_check.md")
    print((out / "gpu_check.md").read_text())
    return 1 if report["failures"] else 0
