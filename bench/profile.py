"""`python -m bench profile`: what one step of each method costs on this device, against its floor.

Times a target forward over k new tokens at a few context lengths (the verify-cost curve that
bounds every speculative method), the LM head alone, and every registered method's own step
components at each context (its `profile` hook: Kangaroo's draft step and deep-layer verification,
Medusa's heads and tree verifications, PLD's lookup, ...). It also measures the device's read-only streaming bandwidth and peak matrix-product FLOP/s,
and from them the floor of a forward over k tokens: max(bytes read ÷ bandwidth, FLOPs ÷ peak),
where the bytes are the weights a forward reads plus the KV cache, and the FLOPs those of every
product (attention included). Each timing is the min and median of several runs after a warm-up,
with a device sync before every clock read.

The read rate behind the floor is the best the machine shows: the 1 GiB stream test or a
one-row OpenBLAS product by the LM head (`lm_head_read_blas`), whichever is faster. On CPU the
forwards are also timed on the BLAS path in the same process (`forward_blas`), so a path's absolute
milliseconds come paired with BLAS's. Where memory bandwidth drifts (a shared host), a floor
measured once and a forward measured a minute later do not compare, so the one-token forward is
also timed in alternation with the read probe (`floor_interleaved`, `forward_interleaved`, and
their median ratio `forward_over_floor_interleaved` in profile.json). For the same reason each
method's component is timed in alternation with a one-token forward at its context and recorded as
that ratio times the `forward` rows' one-token time, so a method's step costs (`StepCosts`) and the
forwards they are compared with describe one machine state.

Writes DIR/profile.csv (component,k,context,ms_min,ms_median; the floor rows are component
`floor`, the measurements `stream_read_1gib`, `lm_head_read_blas` and `peak_matmul`), DIR/profile.json (bandwidth,
peak, bytes and FLOPs of the model) and DIR/figures/profile.png (cost vs k against the floor).
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import methods
from bench.device import sync
from bench.models import LoadedModel

K_VALUES = (1, 2, 4, 8, 16, 32, 64)
CONTEXTS = (128, 1024)
COLUMNS = ["component", "k", "context", "ms_min", "ms_median"]


def timed(function, device: torch.device, repeats: int = 5) -> tuple[float, float]:
    """(min, median) milliseconds of `function()` over `repeats` runs after one warm-up."""
    function()
    times = [once(function, device) for _ in range(repeats)]
    return min(times), statistics.median(times)


def once(function, device: torch.device) -> float:
    """Milliseconds of one call of `function()`."""
    sync(device)
    started = time.perf_counter()
    function()
    sync(device)
    return 1000 * (time.perf_counter() - started)


def _all_threads():
    """Context: torch on every core while measuring the device (the BLAS path runs torch on one)."""
    class Threads:
        def __enter__(self):
            self.threads = torch.get_num_threads()
            torch.set_num_threads(os.cpu_count() or 1)

        def __exit__(self, *exc):
            torch.set_num_threads(self.threads)
    return Threads()


@torch.inference_mode()
def stream_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> tuple[float, float]:
    """Read-only streaming bandwidth in bytes/s and the best time in ms to read `nbytes` of float32:
    the best of `repeats` torch sums and, on CPU, BLAS matrix-vector products over the same data."""
    with _all_threads():
        data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        low, _ = timed(lambda: data.sum(), device, repeats)
        if device.type == "cpu":  # BLAS's matrix-vector product streams faster than torch's sum on some CPUs
            matrix = data.view(-1, 1024).numpy()
            vector = np.ones(1024, dtype=np.float32)
            low = min(low, timed(lambda: matrix @ vector, device, repeats)[0])
        del data
    return nbytes / (low / 1000), low


@torch.inference_mode()
def lm_head_read(runtime, repeats: int = 5) -> tuple[float, float] | None:
    """The read rate of a one-row product by the LM head through OpenBLAS (bytes/s, best ms): the
    rate decoding itself reaches on the largest weight, which on some CPUs beats the stream test.
    The probe is fixed: OpenBLAS's matrix-vector product on the row-major weight in place (no
    copy), `repeats` timings after a warm-up, torch on every core. None off the CPU or float32."""
    weight = runtime.lm_head.weight.detach()
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    matrix, vector = weight.numpy(), np.ones(weight.shape[1], dtype=np.float32)
    with _all_threads():
        low = timed(lambda: matrix @ vector, weight.device, repeats)[0]
    return weight.numel() * 4 / (low / 1000), low


@torch.inference_mode()
def peak_matmul(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> tuple[float, float]:
    """Peak FLOP/s of a large square product in `dtype` (on CPU also through numpy's BLAS, the faster
    counts) and its best time in ms."""
    size = 2048 if device.type == "cpu" else 8192
    flops = 2 * size ** 3
    with _all_threads():
        a = torch.randn(size, size, device=device).to(dtype)
        best = timed(lambda: a @ a, device, repeats)[0]
        if device.type == "cpu" and dtype == torch.float32:
            array = a.numpy()
            best = min(best, timed(lambda: array @ array, device, repeats)[0])
    return flops / (best / 1000), best


def forward_cost(runtime, k: int, context: int) -> tuple[int, int]:
    """(bytes read, FLOPs) of a forward over k new tokens after `context` cached ones: every weight
    that takes part (layers, final norm, LM head; the embedding rows read are negligible) and the KV
    cache; FLOPs of every product, attention over the visible keys included."""
    cfg = runtime.config
    element = torch.finfo(runtime.dtype).bits // 8
    layer_params = sum(p.numel() for p in runtime.layers.parameters())
    head_params = runtime.lm_head.weight.numel()
    linear_params = sum(m.weight.numel() for m in runtime.layers.modules() if isinstance(m, torch.nn.Linear))
    weight_bytes = (layer_params + head_params + runtime.norm.weight.numel()) * element
    kv_bytes, attention_flops = 0, 0
    for kind in cfg.layer_types:
        visible = context + k
        if kind == "sliding" and cfg.sliding_window:
            visible = min(visible, cfg.sliding_window)
        kv_bytes += 2 * cfg.num_kv_heads * cfg.head_dim * min(context, visible) * element
        attention_flops += 2 * 2 * k * visible * cfg.num_heads * cfg.head_dim  # scores and weighted sum
    flops = 2 * k * (linear_params + head_params) + attention_flops
    return weight_bytes + kv_bytes, flops


@torch.inference_mode()
def interleaved_floor_ratio(runtime, cache, context: int, record, rounds: int = 7,
                            stream_bytes: int = 1 << 28) -> float:
    """A one-token forward ÷ its floor, measured in alternation: a machine whose memory bandwidth
    drifts (a shared host) moves both together. Each round times the read probe (the faster of a
    torch sum and a BLAS matrix-vector product over `stream_bytes`) and then the forward at
    `context` (which the cache must already hold); the floor of the round is the forward's bytes at
    the probe's rate. Records rows `floor_interleaved` and `forward_interleaved` (ms over the rounds)
    and returns the median of the rounds' ratios."""
    device = runtime.device
    nbytes, _ = forward_cost(runtime, 1, context)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    data = torch.ones(stream_bytes // 4, dtype=torch.float32, device=device)
    matrix, vector = (data.view(-1, 1024).numpy(), np.ones(1024, dtype=np.float32)) if device.type == "cpu" else (None, None)
    floors, forwards = [], []
    for _ in range(rounds):
        with _all_threads():
            read = timed(lambda: data.sum(), device, 3)[0]
            if matrix is not None:
                read = min(read, timed(lambda: matrix @ vector, device, 3)[0])
        floors.append(nbytes / stream_bytes * read)
        forwards.append(timed(lambda: runtime.forward(token, cache, context), device, 3)[0])
    del data
    record("floor_interleaved", 1, context, min(floors), statistics.median(floors))
    record("forward_interleaved", 1, context, min(forwards), statistics.median(forwards))
    ratio = statistics.median(f / b for f, b in zip(forwards, floors))
    print(f"[profile] one-token forward / floor, interleaved over {rounds} rounds: median {ratio:.2f}", file=sys.stderr)
    return round(ratio, 3)


def floor_ms(runtime, k: int, context: int, bandwidth: float, peak: float) -> float:
    nbytes, flops = forward_cost(runtime, k, context)
    return 1000 * max(nbytes / bandwidth, flops / peak)


@torch.inference_mode()
def profile_rows(model: LoadedModel, k_values=K_VALUES, contexts=CONTEXTS, repeats: int = 5,
                 stream_bytes: int = 1 << 30, paired: str | None = "blas") -> tuple[list[dict], dict]:
    """The timed rows of profile.csv and the device summary of profile.json. On CPU, with `paired`,
    the forwards at the first context are timed again on that product path in the same process
    (rows `forward_<path>`), so two paths are compared on one machine state."""
    runtime, device = model.runtime, model.runtime.device
    vocab = runtime.config.vocab_size
    rows = []

    def record(component, k, context, low, median):
        rows.append({"component": component, "k": k, "context": context, "ms_min": round(low, 3),
                     "ms_median": round(median, 3)})
        print(f"[profile] {component:24} k={k:<3} context={context:<5} min {low:8.2f} ms  median {median:8.2f} ms",
              file=sys.stderr)

    def add(component, k, context, function):
        record(component, k, context, *timed(function, device, repeats))

    bandwidth, read_ms = stream_bandwidth(device, stream_bytes)
    record("stream_read_1gib", 0, 0, read_ms * (1 << 30) / stream_bytes, read_ms * (1 << 30) / stream_bytes)
    head_read = lm_head_read(runtime, repeats)
    if head_read is not None:  # the floor uses the best read rate the machine shows
        record("lm_head_read_blas", 1, 0, head_read[1], head_read[1])
        bandwidth = max(bandwidth, head_read[0])
    peak, matmul_ms = peak_matmul(device, runtime.dtype)
    record("peak_matmul", 0, 0, matmul_ms, matmul_ms)
    print(f"[profile] bandwidth {bandwidth / 1e9:.1f} GB/s, peak {peak / 1e9:.1f} GFLOP/s", file=sys.stderr)
    for context in contexts:
        for k in k_values:
            floor = floor_ms(runtime, k, context, bandwidth, peak)
            record("floor", k, context, floor, floor)

    cache = runtime.new_cache(max(contexts) + max(max(k_values), 64) + 16)  # room for the largest tree
    generator = torch.Generator().manual_seed(0)
    for context in contexts:
        prefix = torch.randint(0, vocab, (1, context), generator=generator).to(device)
        runtime.forward(prefix, cache, 0, last_only=True)  # fill the cache (timing ignores its content)
        for k in k_values:
            tokens = torch.randint(0, vocab, (1, k), generator=generator).to(device)
            add("forward", k, context, lambda: runtime.forward(tokens, cache, context))
    ratio = interleaved_floor_ratio(runtime, cache, contexts[0], record)
    path = runtime.matmul
    if paired and paired != path and device.type == "cpu":  # the same forwards on another path, same process
        runtime.set_matmul(paired)
        context = contexts[0]
        for k in k_values:
            tokens = torch.randint(0, vocab, (1, k), generator=generator).to(device)
            add(f"forward_{paired}", k, context, lambda: runtime.forward(tokens, cache, context))
        runtime.set_matmul(path)
    hidden = {k: torch.randn(1, k, runtime.config.hidden_size, dtype=runtime.dtype, device=device) for k in k_values}
    for k in k_values:
        add("lm_head", k, 0, lambda: runtime.lm_head(hidden[k]))

    steps = {r["context"]: r["ms_min"] for r in rows if r["component"] == "forward" and r["k"] == 1}
    one_token = torch.zeros(1, 1, dtype=torch.long, device=device)

    def add_paired(component, k, context, function):
        """A method's component, each repeat right after a one-token forward at the same context,
        recorded as its ratio to that forward times the `forward` rows' one-token time: a method's
        step costs and the forwards they are compared with then share one machine state, though
        this host's memory speed can drift by 2x between the forward rows and the methods' rows."""
        if context not in steps:
            return add(component, k, context, function)

        def step():
            runtime.forward(one_token, cache, context)
        function()  # warm-up
        step()
        ratios = [once(function, device) / once(step, device) for _ in range(repeats)]
        record(component, k, context, min(ratios) * steps[context], statistics.median(ratios) * steps[context])

    for name, method in methods.available().items():  # each method's own step components (its hook)
        for context in contexts:
            try:
                method.profile(runtime, cache, context, lambda component, k, function, context=context:
                               add_paired(component, k, context, function))
            except methods.MissingCheckpoint as error:
                print(f"[profile] {name} skipped: {error}", file=sys.stderr)
                break
    summary = {"device": device.type, "dtype": str(runtime.dtype).removeprefix("torch."),
               "matmul": getattr(runtime, "matmul", None), "bandwidth_bytes_per_s": bandwidth,
               "peak_flops_per_s": peak, "k_values": list(k_values), "contexts": list(contexts),
               "forward_over_floor_interleaved": ratio,
               "forward_bytes": {str(k): forward_cost(runtime, k, contexts[0])[0] for k in k_values},
               "forward_flops": {str(k): forward_cost(runtime, k, contexts[0])[1] for k in k_values}}
    return rows, summary


def write_rows(rows: list[dict], path: Path) -> Path:
    """profile.csv: component,k,context,ms_min,ms_median."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_profile(model: LoadedModel, out: Path, **options) -> Path:
    rows, summary = profile_rows(model, **options)
    path = write_rows(rows, out / "profile.csv")
    summary["model"] = model.alias
    (out / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_profile(path, out / "figures" / "profile.png", title=f"{model.alias} on {summary['device']}/"
                 f"{summary['dtype']} ({summary['matmul'] or 'torch'} products)")
    return path


def read_profile(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [{**row, "k": int(row["k"]), "context": int(row["context"]), "ms_min": float(row["ms_min"]),
                 "ms_median": float(row["ms_median"])} for row in csv.DictReader(handle)]


def floor_ratios(rows: list[dict]) -> dict[tuple[int, int], float]:
    """(k, context) -> forward's best time ÷ its floor."""
    floors = {(r["k"], r["context"]): r["ms_min"] for r in rows if r["component"] == "floor"}
    return {(r["k"], r["context"]): r["ms_min"] / floors[(r["k"], r["context"])]
            for r in rows if r["component"] == "forward" and (r["k"], r["context"]) in floors}


def plot_profile(csv_path: Path, png_path: Path, title: str = "") -> Path:
    """Cost of a forward over k tokens (per context length) and of the LM head, against the floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_profile(csv_path)
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    contexts = sorted({r["context"] for r in rows if r["component"] == "forward"})
    for index, context in enumerate(contexts):
        color = f"C{index}"
        for component, style, label in (("forward", "o-", "forward"), ("floor", "--", "floor")):
            points = sorted((r["k"], r["ms_min"]) for r in rows
                            if r["component"] == component and r["context"] == context)
            if points:
                axes.plot(*zip(*points), style, color=color, label=f"{label}, context {context}")
    head = sorted((r["k"], r["ms_min"]) for r in rows if r["component"] == "lm_head")
    if head:
        axes.plot(*zip(*head), "s:", color="gray", label="LM head alone")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("new tokens in one forward (k)")
    axes.set_ylabel("ms (best of runs)")
    axes.set_ylim(bottom=0)
    axes.set_title(title or "verify cost vs k")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return png_path
