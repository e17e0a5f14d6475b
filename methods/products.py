"""The CPU matrix-product paths of the runtime's linear layers (DESIGN.md §3), and their choice.

Decoding and verification multiply 1-16 rows by every weight. How fast that is on a CPU depends on
the library, so each linear layer can route its products through one of three paths:

- "torch": torch's own product (MKL/oneDNN; the only path on a GPU). Modules whose input goes
  through several layers (q/k/v, gate/up) keep those layers' weights side by side in one tensor,
  the layers' weights being views of it, and make one product;
- "blas": numpy/OpenBLAS on contiguous transposed copies of the weights (q/k/v and gate/up side by
  side in one array), sharing the result with torch at no cost;
- "kernel": the harness's skinny product (methods/kernels.py) on a packed copy of the weights
  (q/k/v and gate/up side by side), k-row products bit-identical to k one-row ones.

`pick_matmul_path` chooses one for a model (`auto`: the fastest for the rows it will multiply).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods import kernels

MATMUL_PATHS = ("torch", "blas", "kernel")
DEFAULT_TORCH_THREADS = torch.get_num_threads()
# Up to this many rows the kernel path multiplies with the skinny kernel (16 rows a pass); more
# rows (a prefill, a 64-node tree) go to OpenBLAS's GEMM, which is faster there (a forward over 64
# tokens on the 2-core EPYC: 601 ms through the kernel, 485 ms through OpenBLAS; over 32: 336 and 366).
KERNEL_MAX_ROWS = 32


class Linear(nn.Linear):
    """nn.Linear with host matrix-product paths for CPU inference (DESIGN.md §3).

    - "blas": a contiguous transposed copy of the weight as a numpy array, multiplied through
      numpy/OpenBLAS (2-3x faster than torch's product for the skinny shapes of decoding on some
      CPUs); torch.from_numpy shares the result at no cost.
    - "kernel": up to 32 rows through methods/kernels.py's skinny product on a packed copy of the
      weight (a k-row product is bit-identical to k 1-row ones); more rows (a prefill) through
      OpenBLAS's GEMM on the torch weight.
    The torch weight stays (the transformers model shares it). Tensors that need gradients, or
    live on a GPU, always take the torch path."""

    host_path: str | None = None
    host_weight: np.ndarray | None = None
    _product: kernels.Product | None = None

    def use_path(self, path: str, eager: bool = True) -> None:
        """Route this layer's products through `path` ("torch", "blas" or "kernel"). On the kernel
        path the weight is packed now, or (`eager=False`, for a layer whose products usually go
        through its FusedProjections module) on its first product."""
        self._product = None
        if path == "blas":
            if self.host_path != "blas":
                self.host_weight = np.ascontiguousarray(self.weight.detach().cpu().numpy().T)
        elif path == "kernel" and kernels.accepts(self.weight):
            self.host_weight = None
            if eager:
                self._product = kernels.Product(self.weight.detach())
        else:
            path, self.host_weight = "torch", None
        self.host_path = None if path == "torch" else path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.host_path is None or _needs_torch(x, [self.weight]):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        if self.host_path == "blas":
            out = torch.from_numpy(np.matmul(flat.numpy(), self.host_weight))
        elif flat.shape[0] <= KERNEL_MAX_ROWS:
            out = _current_product(self, [self])(flat)
        else:
            out = torch.from_numpy(np.matmul(flat.numpy(), self.weight.detach().numpy().T))
        out = out.view(*x.shape[:-1], out.shape[-1])  # [..., out_features]
        return out + self.bias if self.bias is not None else out


def _current_product(owner: nn.Module, linears: list[Linear]) -> kernels.Product:
    """The owner's kernel product if it still multiplies by these layers' weights as they are, else
    a new one, kept on the owner (a weight replaced since, e.g. by `module.weight.data = ...`, or
    changed in place, is packed again)."""
    product = owner._product
    weights = [linear.weight for linear in linears]
    if product is None or not product.is_current(weights):
        product = kernels.Product(*(weight.detach() for weight in weights))
        owner._product = product
    return product


def set_torch_threads(path: str) -> None:
    """Another library's threads and torch's OpenMP pool spin against each other on a few cores:
    with the host paths the products use their own threads and torch's small operations one."""
    if path in ("blas", "kernel"):
        torch.set_num_threads(1)
    elif torch.get_num_threads() == 1 and DEFAULT_TORCH_THREADS > 1:
        torch.set_num_threads(DEFAULT_TORCH_THREADS)


def _needs_grad(x: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))


def _needs_torch(x: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Gradients or a GPU: the product must go through torch."""
    return x.device.type != "cpu" or _needs_grad(x, weights)


class FusedProjections(nn.Module):
    """Base of modules whose input goes through several linear layers at once (q/k/v; gate/up).

    - torch path (CPU or GPU): after `fuse_weights` the layers' weights sit side by side in one
      tensor and each layer's weight is a view of it, so one product serves all of them with no
      second copy (the transformers model sharing the weights is pointed at the same views).
    - BLAS path: the transposed weights sit side by side in one array, so one product serves all
      of them (fewer, wider products for the 1-16 rows of decoding).
    - kernel path: one kernel call streams all the weights in place."""

    fused_names: tuple[str, ...] = ()
    fused_path: str | None = None  # "blas" or "kernel" when the host products are fused
    fused_weight: np.ndarray | None = None
    fused_bias: torch.Tensor | None = None
    torch_weight: torch.Tensor | None = None  # [sum of out, in]: the layers' weights are views of it
    torch_bias: torch.Tensor | None = None
    _torch_pointers: tuple[int, ...] = ()
    _product: kernels.Product | None = None

    def _linears(self) -> list["Linear"]:
        return [getattr(self, name) for name in self.fused_names]

    @torch.no_grad()
    def fuse_weights(self) -> dict[str, torch.Tensor]:
        """Store the layers' weights (and biases) side by side in one tensor each and make every
        layer's parameter a view of it. Returns {local parameter name: its new tensor}, so that other
        holders of the old tensors (a transformers model) can be pointed at the views."""
        linears = self._linears()
        views: dict[str, torch.Tensor] = {}
        self.torch_weight = torch.cat([linear.weight.detach() for linear in linears])
        biases = [linear.bias for linear in linears]
        self.torch_bias = None
        if all(bias is not None for bias in biases):
            self.torch_bias = torch.cat([bias.detach() for bias in biases])
        offset = 0
        for name, linear in zip(self.fused_names, linears):
            rows = slice(offset, offset + linear.out_features)
            linear.weight = nn.Parameter(self.torch_weight[rows], requires_grad=False)
            views[f"{name}.weight"] = linear.weight
            if self.torch_bias is not None:
                linear.bias = nn.Parameter(self.torch_bias[rows], requires_grad=False)
                views[f"{name}.bias"] = linear.bias
            offset += linear.out_features
        self._torch_pointers = tuple(linear.weight.data_ptr() for linear in linears)
        return views

    def use_path(self, path: str) -> None:
        linears = self._linears()
        self.fused_weight = self.fused_bias = self._product = self.fused_path = None
        for linear in linears:
            linear.use_path("torch" if path == "blas" else path, eager=False)
        if path == "blas":
            self.fused_weight = np.ascontiguousarray(
                np.concatenate([linear.weight.detach().cpu().numpy().T for linear in linears], axis=1))
        elif not (path == "kernel" and all(linear.host_path == "kernel" for linear in linears)):
            return
        else:
            self._product = kernels.Product(*(linear.weight.detach() for linear in linears))
        self.fused_path = path
        biases = [linear.bias for linear in linears]
        if any(b is not None for b in biases):
            self.fused_bias = torch.cat([b.detach() if b is not None else torch.zeros(l.out_features, dtype=l.weight.dtype)
                                         for b, l in zip(biases, linears)])

    def project(self, x: torch.Tensor, joint: bool = False) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """Each fused layer applied to x [..., in]; with `joint`, their outputs side by side in one
        contiguous tensor [..., sum of out]."""
        linears = self._linears()
        weights = [linear.weight for linear in linears]
        flat = x.reshape(-1, x.shape[-1])
        if (self.fused_path is None or _needs_torch(x, weights)
                or (self.fused_path == "kernel" and flat.shape[0] > KERNEL_MAX_ROWS)):
            if self.torch_weight is None or _needs_grad(x, weights) or \
                    self._torch_pointers != tuple(w.data_ptr() for w in weights):  # weights replaced since
                outs = tuple(linear(x) for linear in linears)
                return torch.cat(outs, dim=-1) if joint else outs
            out = F.linear(x, self.torch_weight, self.torch_bias)
        else:
            if self.fused_path == "blas":
                out = torch.from_numpy(np.matmul(flat.numpy(), self.fused_weight))
            else:
                out = _current_product(self, linears)(flat)
            out = out.view(*x.shape[:-1], out.shape[-1])
            if self.fused_bias is not None:
                out = out + self.fused_bias
        if joint:
            return out
        return out.split([linear.out_features for linear in linears], dim=-1)


def set_matmul_path(root: nn.Module, path: str) -> None:
    """Route every linear layer under `root` through `path` ("torch", "blas" or "kernel"); on the
    BLAS path the q/k/v and gate/up products are fused. Other modules with a `use_path` method (the
    runtime's norms, which the kernel path fuses) are told too."""
    for module in root.modules():
        if isinstance(module, Linear):
            module.use_path(path)
    for module in root.modules():
        if isinstance(module, FusedProjections):
            module.use_path(path)
    for module in root.modules():
        if not isinstance(module, (Linear, FusedProjections)) and callable(getattr(module, "use_path", None)):
            module.use_path(path)


def module_bytes(module: nn.Module) -> int:
    """Memory a module holds: its distinct parameter storage, plus the host copies of its weights
    that a CPU product path made (BLAS's transposed weights, the kernel's packed ones)."""
    seen, total = set(), 0
    for parameter in module.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    for child in module.modules():
        for copy in (getattr(child, "host_weight", None), getattr(child, "fused_weight", None),
                     getattr(child, "_product", None)):
            if copy is not None:
                total += copy.nbytes
    return total


def pick_matmul_path(model, requested: str = "auto", rows: int = 1) -> str:
    """The matrix-product path for this model on this machine: `requested`, or for "auto": torch
    on a GPU, else the CPU path whose forward over one new token (`rows` sequences side by side, for
    batched generation) after a short prefix is fastest, among torch, BLAS and the kernel (where it
    compiles and the model is float32). The autoregressive baseline runs at its fastest, so that no
    method's speedup is inflated by a baseline slowed for the methods' sake. Each path is set in turn,
    two rounds, each path's best time counted. Sets the path on the model and returns it."""
    if requested != "auto":
        path = requested
    elif model.device.type != "cpu":
        path = "torch"
    else:
        path = _fastest_path(model, rows)
    model.set_matmul(path)
    return path


def candidate_paths(model) -> list[str]:
    """The CPU product paths this model can take here."""
    paths = ["torch"]
    if model.dtype in (torch.float32, torch.float64):
        paths.append("blas")
    if model.dtype == torch.float32 and kernels.load() is not None:
        paths.append("kernel")
    return paths


def _fastest_path(model, rows: int, prefix: int = 8, rounds: int = 2, repeats: int = 3) -> str:
    """The path with the fastest one-token forward (see pick_matmul_path)."""
    candidates = candidate_paths(model)
    if len(candidates) == 1:
        return candidates[0]
    best = dict.fromkeys(candidates, math.inf)
    tokens = torch.zeros(rows, prefix + 1, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        for _ in range(rounds):
            for path in candidates:
                model.set_matmul(path)
                cache = model.new_cache(prefix + 1, batch=rows)
                model.forward(tokens[:, :prefix], cache, 0, last_only=True)
                model.forward(tokens[:, prefix:], cache, prefix)  # warm-up
                for _ in range(repeats):
                    started = time.perf_counter()
                    model.forward(tokens[:, prefix:], cache, prefix)
                    best[path] = min(best[path], time.perf_counter() - started)
    return min(best, key=best.get)
