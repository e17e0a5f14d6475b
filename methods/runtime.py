"""The transformer runtime that every decoding method shares.

One compact PyTorch decoder for the Llama (Vicuna, Llama-2/3, Mistral), Qwen2 and Gemma3 families:
plain functions, explicit positions, a preallocated KV cache written by slot, and a forward over any
range of layers, so that a method can run layers [0, l) and [l, N) separately on one cache
(Kangaroo) or verify a token tree in one pass (Medusa). The KV cache and masks live in
methods/cache.py, the CPU product paths of the linear layers in methods/products.py.

Behaviour that must match transformers (proved by tests/test_runtime.py) is marked "matches HF":
where the reference upcasts to float32 (norms, RoPE tables) we do the same, so that float64 runs
agree to the last bit that matters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods import kernels
from methods.cache import AttentionContext, KVCache
from methods.products import MATMUL_PATHS, FusedProjections, Linear, set_matmul_path, set_torch_threads

FAMILIES = ("llama", "qwen2", "gemma3")
# Up to this many new tokens, CPU attention is computed with plain products (_grouped_attention).
SMALL_ATTENTION_QUERIES = 64


@dataclass
class TransformerConfig:
    family: str  # one of FAMILIES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...} or None
    local_rope_theta: float | None = None  # RoPE base of sliding-window layers (Gemma3)
    sliding_window: int | None = None  # a key is visible while query_pos - key_pos < window
    layer_types: list[str] = field(default_factory=list)  # "full" | "sliding" per layer
    qkv_bias: bool = False
    o_bias: bool = False
    hidden_act: str = "silu"  # "silu" | "gelu_tanh"
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by this ** -0.5
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    tie_word_embeddings: bool = False
    max_positions: int | None = None  # positions the model was trained for (max_position_embeddings)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if not self.layer_types:
            self.layer_types = ["full"] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")

    @property
    def gemma(self) -> bool:
        """Gemma's quirks: (1 + w) norms, q/k norms, four norms per layer, scaled embeddings."""
        return self.family == "gemma3"

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


class RMSNorm(nn.Module):
    """Root-mean-square norm. Llama style: w * x̂; Gemma style: x̂ * (1 + w). Matches HF: the
    statistics are computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float, plus_one: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))
        self.eps = eps
        self.plus_one = plus_one
        self.fused = False  # on the kernel path: one call of the kernel library (kernels.rms_norm)

    def use_path(self, path: str) -> None:
        """On the `kernel` matmul path, norms without autograd run as one fused call."""
        self.fused = path == "kernel" and kernels.load() is not None

    def _fusable(self, x: torch.Tensor) -> bool:
        return (self.fused and not torch.is_grad_enabled() and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous())

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x), in one call where the norm is fused."""
        if self._fusable(x) and residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous():
            return kernels.rms_norm(x, self._scale(), self.eps, residual)
        return residual + self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable(x):
            return kernels.rms_norm(x, self._scale(), self.eps)
        # In float32 without weight gradients, the same numbers in fewer operations (decoding runs
        # over a hundred norms a step): no casts, and Gemma's 1 + w computed once per weight version.
        fast = x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not (
            torch.is_grad_enabled() and self.weight.requires_grad)
        x32 = x if fast else x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if fast:
            return normed * self._scale()
        if self.plus_one:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)

    def _scale(self) -> torch.Tensor:
        """The factor the normalized input is multiplied by: w, or 1 + w (cached)."""
        if not self.plus_one:
            return self.weight
        if self.weight.is_inference():  # made under inference mode: no version counter to key on
            return 1.0 + self.weight
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if getattr(self, "_scale_key", None) != key:
            with torch.inference_mode(False), torch.no_grad():  # usable later with autograd on
                self._scale_key, self._scale_value = key, 1.0 + self.weight.detach()
        return self._scale_value


class Attention(FusedProjections):
    fused_names = ("q_proj", "k_proj", "v_proj")

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        h, q_dim, kv_dim = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(h, q_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(h, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(h, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_dim, h, bias=cfg.o_bias)
        if cfg.gemma:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, plus_one=True)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, plus_one=True)


class MLP(FusedProjections):
    fused_names = ("gate_proj", "up_proj")

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    """One decoder layer. `with_mlp=False` gives Kangaroo's adapter block (attention only)."""

    def __init__(self, cfg: TransformerConfig, with_mlp: bool = True):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plus_one=cfg.gemma)  # noqa: E731
        self.self_attn = Attention(cfg)
        self.input_layernorm = norm()
        if with_mlp:
            self.mlp = MLP(cfg)
            self.post_attention_layernorm = norm()
            if cfg.gemma:
                self.pre_feedforward_layernorm = norm()
                self.post_feedforward_layernorm = norm()


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale for RoPE ("default", "linear" and "llama3")."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Transformer(nn.Module):
    """The decoder. Parameter names follow transformers' (minus the "model." prefix), so a
    checkpoint's state dict loads directly. `source_model` may hold the transformers model whose
    tensors these parameters share (used by the `hf-generate` reference method)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plus_one=cfg.gemma)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_rope()
        self.source_model = None  # the transformers model sharing these tensors, if any
        self.alias: str | None = None  # the catalog alias, to find committed checkpoints
        self.vocab_ranking = None  # callable -> token ids by decreasing frequency (for draft_vocab)
        self.matmul = "torch"
        # One device per decoder layer when the layers are split over several devices (see
        # place_layers); None when the whole model sits on `device`.
        self.layer_devices: list[torch.device] | None = None
        self.requires_grad_(False)

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE frequency buffers, e.g. after the weights were loaded onto a device."""
        cfg = self.config
        inv_freq, self.rope_scale = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        local_scaling = None if cfg.local_rope_theta else cfg.rope_scaling
        local_inv_freq, _ = rope_inv_freq(cfg.head_dim, cfg.local_rope_theta or cfg.rope_theta, local_scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("local_inv_freq", local_inv_freq.to(device), persistent=False)

    # ---- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def set_matmul(self, path: str) -> None:
        """Route every linear layer through `path` ("torch", "blas" or "kernel")."""
        if path not in MATMUL_PATHS:
            raise ValueError(f"unknown matmul path {path!r}; valid: {', '.join(MATMUL_PATHS)}")
        if path != "torch" and self.device.type != "cpu":
            raise ValueError(f"the {path} matmul path is for CPUs; use torch on {self.device.type}")
        if path == "kernel":
            if self.dtype != torch.float32:
                raise ValueError(f"the kernel matmul path computes in float32, not {self.dtype}")
            if kernels.load() is None:
                raise ValueError(f"the kernel matmul path is unavailable here: {kernels.unavailable_reason()}")
        set_matmul_path(self, path)
        self.matmul = path
        set_torch_threads(path)

    def place_layers(self, split: bool | None = None) -> None:
        """Record where the decoder layers live. A model whose layers sit on several devices (a
        checkpoint loaded with a device map) runs as a pipeline: each layer runs on its own
        device with its KV cache there, and the hidden state moves between devices. Everything
        else (embedding, final norm, LM head, and the methods' own modules) stays on `device`,
        and every public function takes and returns tensors there. `split=True` forces the
        per-layer layout on one device (to test it without several devices)."""
        devices = [next(layer.parameters()).device for layer in self.layers]
        home = self.device
        for name, module in (("final norm", self.norm), ("LM head", self.lm_head)):
            if module.weight.device != home:
                raise ValueError(f"the {name} is on {module.weight.device} but the embedding on {home}; "
                                 f"a split model keeps both on the embedding's device")
        if split is None:
            split = any(device != home for device in devices)
        self.layer_devices = devices if split else None

    def fuse_projections(self) -> dict[str, torch.Tensor]:
        """Put every layer's q/k/v and gate/up weights side by side (FusedProjections.fuse_weights)
        so that the torch path makes one product for each group. Returns {parameter name: view}."""
        views = {}
        for prefix, module in self.named_modules():
            if isinstance(module, FusedProjections):
                views.update({f"{prefix}.{name}": view for name, view in module.fuse_weights().items()})
        return views

    def new_cache(self, max_len: int, num_layers: int | None = None, batch: int = 1) -> KVCache:
        """A KV cache for all decoder layers (laid out like them: split when they are), or for
        `num_layers` extra blocks on the model's device (e.g. Kangaroo's adapter); `batch` rows
        that share their slots and positions."""
        cfg = self.config
        devices = self.layer_devices if num_layers is None else None
        return KVCache(num_layers or cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max_len, self.dtype, self.device,
                       batch=batch, devices=devices)

    def weight_bytes(self) -> int:
        """Bytes of distinct parameter storage (a tied LM head counts once)."""
        seen, total = set(), 0
        for p in self.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total

    # ---- the forward pieces ------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(tokens)  # [B, T, H]
        if self.config.gemma:  # matches HF: sqrt(hidden) rounded to float32, then to the weight dtype
            hidden = hidden * torch.tensor(self.config.hidden_size ** 0.5, dtype=torch.float32).to(hidden.dtype)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and (when configured) the logit soft cap. [B, T, H] -> [B, T, V]"""
        return self.head_logits(self.norm(hidden))

    def head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """LM head and (when configured) the logit soft cap on hidden states the final norm already
        normed. [..., H] -> [..., V]"""
        logits = self.lm_head(normed)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def rope(self, positions: torch.Tensor, local: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables [T, head_dim]; matches HF: computed in float32, then cast."""
        inv_freq = self.local_inv_freq if local else self.inv_freq
        freqs = positions[:, None].float() * inv_freq[None, :].float()  # [T, head_dim/2]
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.rope_scale).to(dtype), (angles.sin() * self.rope_scale).to(dtype)

    def forward_layers(self, hidden: torch.Tensor, cache: KVCache, start: int,
                       positions: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                       layers: range | None = None) -> torch.Tensor:
        """Run `layers` (default: all) over `hidden` [B, T, H], whose tokens go to cache slots
        [start, start + T). `positions` [T] are their RoPE positions (default: the slots). Each
        token sees the prefix slots [0, start) and, among the new ones, the earlier tokens
        (causal) or those `tree_mask` [T, T] allows; a `tree_mask` [T, E + T] also decides which of
        the E slots before `start` each sees (earlier draft-tree nodes). Returns hidden [B, T, H]."""
        T = hidden.shape[1]
        if positions is None:
            positions = torch.arange(start, start + T, device=hidden.device)
        if start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} slots; {start + T} needed")
        cache.positions[start:start + T] = positions
        layers = layers if layers is not None else range(self.config.num_layers)
        context = AttentionContext(self, cache, start, T, positions, tree_mask, hidden.dtype)
        if self.layer_devices is None:
            for index in layers:
                hidden = self.layer_forward(self.layers[index], hidden, context, index)
            return hidden
        home = hidden.device
        for index in layers:
            hidden = self.layer_forward(self.layers[index], hidden.to(self.layer_devices[index]), context, index)
        return hidden.to(home)

    def forward_block(self, layer: DecoderLayer, hidden: torch.Tensor, cache: KVCache, start: int,
                      cache_layer: int = 0, positions: torch.Tensor | None = None,
                      tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run an extra layer of this model's kind (e.g. Kangaroo's adapter) on [B, T, H] at slots
        [start, start + T) of its own cache, with full (not sliding) attention and the global RoPE;
        `positions` and `tree_mask` as in forward_layers (a draft tree's nodes)."""
        T = hidden.shape[1]
        if positions is None:
            positions = torch.arange(start, start + T, device=hidden.device)
        cache.positions[start:start + T] = positions
        context = AttentionContext(self, cache, start, T, positions, tree_mask, hidden.dtype)
        return self.layer_forward(layer, hidden, context, cache_layer, sliding=False)

    def layer_forward(self, layer: DecoderLayer, hidden: torch.Tensor, context: "AttentionContext",
                      cache_layer: int, sliding: bool | None = None) -> torch.Tensor:
        """One decoder layer (or an MLP-less adapter block) on [B, T, H]."""
        if sliding is None:
            sliding = self.config.layer_types[cache_layer] == "sliding"
        gemma = self.config.gemma
        attended = self.attention(layer.self_attn, layer.input_layernorm(hidden), context, cache_layer, sliding)
        if not hasattr(layer, "mlp"):
            return hidden + attended
        if gemma:
            hidden = layer.post_attention_layernorm.add_to(hidden, attended)
            mlp_out = self.mlp(layer.mlp, layer.pre_feedforward_layernorm(hidden))
            return layer.post_feedforward_layernorm.add_to(hidden, mlp_out)
        hidden = hidden + attended
        return hidden + self.mlp(layer.mlp, layer.post_attention_layernorm(hidden))

    def mlp(self, mlp: MLP, x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.project(x)  # [B, T, I] each
        gate = F.gelu(gate, approximate="tanh") if self.config.hidden_act == "gelu_tanh" else F.silu(gate)
        return mlp.down_proj(gate * up)

    def _fused_ops(self, x: torch.Tensor) -> bool:
        """Whether this forward runs the layer's small operations as fused calls (kernel path,
        float32 on the CPU, no autograd)."""
        return (self.matmul == "kernel" and not torch.is_grad_enabled() and x.dtype == torch.float32
                and x.device.type == "cpu" and kernels.load() is not None)

    def attention(self, attn: Attention, x: torch.Tensor, context: "AttentionContext",
                  cache_layer: int, sliding: bool) -> torch.Tensor:
        cfg, cache = self.config, context.cache
        B, T, _ = x.shape
        cos, sin = context.rope(sliding, x.device)
        fused = self._fused_ops(x)
        if fused:  # one call per q and k: heads out of the projection, normed, rotated
            joint = attn.project(x, joint=True)  # [B, T, (nh + 2 nkv) hd]
            norms = (attn.q_norm, attn.k_norm) if cfg.gemma else (None, None)
            q, k = (kernels.heads_norm_rope(joint, first, heads, cfg.head_dim, cos, sin,
                                            None if norm is None else norm._scale(), norm.eps if norm else 0.0)
                    for first, heads, norm in ((0, cfg.num_heads, norms[0]), (cfg.num_heads, cfg.num_kv_heads, norms[1])))
            v = joint[..., (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim:]
            v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        else:
            q, k, v = attn.project(x)
            q = q.view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [B, nh, T, hd]
            k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, nkv, T, hd]
            v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            if cfg.gemma:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        end = context.start + T
        layer_keys, layer_values = cache.k[cache_layer], cache.v[cache_layer]  # [B, nkv, max_len, hd]
        layer_keys[:, :, context.start:end] = k
        layer_values[:, :, context.start:end] = v
        low, mask = context.mask(sliding, x.device)
        keys, values = layer_keys[:, :, low:end], layer_values[:, :, low:end]  # [B, nkv, L, hd]
        if fused and not cfg.attn_logit_softcapping and T <= SMALL_ATTENTION_QUERIES and not isinstance(mask, str) \
                and layer_keys.is_contiguous() and (mask is None or (mask.is_contiguous() and mask.dtype == torch.float32)):
            return attn.o_proj(kernels.attention(q, layer_keys, layer_values, low, end, mask, cfg.attention_scale))
        if cfg.attn_logit_softcapping:
            out = _softcapped_attention(q, keys, values, mask, cfg.attention_scale, cfg.attn_logit_softcapping)
        elif x.device.type == "cpu" and T <= SMALL_ATTENTION_QUERIES and not isinstance(mask, str):
            out = _grouped_attention(q, keys, values, mask, cfg.attention_scale)
        else:
            causal = isinstance(mask, str)  # "causal": a fresh prefill, SDPA's own causal kernel
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=None if causal else mask,
                                                 is_causal=causal, scale=cfg.attention_scale,
                                                 enable_gqa=cfg.num_heads != cfg.num_kv_heads)
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim))

    def forward(self, tokens: torch.Tensor, cache: KVCache, start: int, positions: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits for `tokens` [B, T] written at slots [start, start + T): [B, T, V], or
        [B, 1, V] for the last token only with `last_only` (a prefill needs no more)."""
        hidden = self.forward_layers(self.embed(tokens), cache, start, positions, tree_mask)
        return self.logits(hidden[:, -1:] if last_only else hidden)


def _grouped_attention(q, keys, values, mask, scale):
    """Attention of a few queries (decoding, verification) on CPU as two plain products and a
    softmax: SDPA's CPU kernel costs about 0.1 ms a call however small the call. The query heads
    that share a KV head are stacked, so no key or value is repeated. q [B, nh, T, hd], keys and
    values [B, nkv, L, hd], mask None or additive [T, L]."""
    B, heads, T, head_dim = q.shape
    kv_heads, L = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(q.reshape(B, kv_heads, group * T, head_dim), keys.transpose(-1, -2)) * scale
    if mask is not None:
        scores = (scores.view(B, kv_heads, group, T, L) + mask).view(B, kv_heads, group * T, L)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if q.element_size() < 4 else q.dtype).to(q.dtype)
    return torch.matmul(probs, values).view(B, heads, T, head_dim)


def _softcapped_attention(q, keys, values, mask, scale, cap):
    """Attention with tanh-capped scores (Gemma-2 style), where SDPA cannot do it."""
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ keys.transpose(-1, -2)) * scale / cap) * cap  # [B, nh, T, L]
    if isinstance(mask, str):
        T, L = scores.shape[-2:]
        mask = torch.zeros(T, L, dtype=scores.dtype, device=scores.device).masked_fill_(
            torch.ones(T, L, dtype=torch.bool, device=scores.device).triu_(L - T + 1), float("-inf"))
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values


