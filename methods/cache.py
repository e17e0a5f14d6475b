"""The KV cache and the attention context of one forward: masks and RoPE tables.

Slots and positions are separate: a token is written to a cache *slot* and rotated by its RoPE
*position*. In linear decoding the two are equal; in tree verification the nodes sit in consecutive
slots after the prefix while their position is prefix length + depth. The cache remembers each
slot's position, which the sliding-window mask needs.
"""
from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values, written by slot: `k[layer]` and `v[layer]` are
    [batch, kv_heads, max_len, head_dim]. On one device they are views of one tensor
    [layers, batch, kv_heads, max_len, head_dim]; for a model split over devices (`devices`, one
    per layer) they are a list of per-layer tensors, each on its layer's device.

    Rejected drafts need no rollback: the next write to those slots overwrites them. `positions`
    holds the RoPE position of each slot (for the sliding-window mask), on `device`."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, batch: int = 1,
                 devices: list[torch.device] | None = None):
        shape = (batch, num_kv_heads, max_len, head_dim)
        if devices is None:
            self.k = torch.zeros((num_layers,) + shape, dtype=dtype, device=device)
            self.v = torch.zeros((num_layers,) + shape, dtype=dtype, device=device)
        else:
            if len(devices) != num_layers:
                raise ValueError(f"{len(devices)} devices for {num_layers} cache layers")
            self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
            self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.positions = torch.zeros(max_len, dtype=torch.long, device=device)

    @property
    def max_len(self) -> int:
        return self.positions.shape[0]

    @property
    def nbytes(self) -> int:
        return 2 * sum(layer.numel() * layer.element_size() for layer in self.k)

    def move(self, source_slots: torch.Tensor, destination_start: int) -> None:
        """Copy the entries at `source_slots` to consecutive slots from `destination_start`
        (tree verification: the accepted path's entries are put in place)."""
        n = source_slots.numel()
        destination = slice(destination_start, destination_start + n)
        if isinstance(self.k, torch.Tensor):
            self.k[:, :, :, destination] = self.k[:, :, :, source_slots]
            self.v[:, :, :, destination] = self.v[:, :, :, source_slots]
        else:
            for keys, values in zip(self.k, self.v):
                slots = source_slots.to(keys.device)
                keys[:, :, destination] = keys[:, :, slots]
                values[:, :, destination] = values[:, :, slots]
        self.positions[destination] = self.positions[source_slots]


class AttentionContext:
    """What every layer of one forward shares: RoPE tables and masks, built once per kind (and
    copied once to each device of a split model)."""

    def __init__(self, model, cache: KVCache, start: int, T: int,
                 positions: torch.Tensor, tree_mask: torch.Tensor | None, dtype: torch.dtype):
        self.model, self.cache, self.start, self.T = model, cache, start, T
        self.positions, self.tree_mask, self.dtype = positions, tree_mask, dtype
        self._rope: dict[tuple, tuple] = {}
        self._masks: dict[tuple, tuple] = {}

    def _per_device(self, table: dict, key, device: torch.device, build) -> tuple:
        """table[key, device]: built once on the positions' device, copied once to each other one."""
        if (key, device) not in table:
            home = self.positions.device
            if (key, home) not in table:
                table[key, home] = build()
            table[key, device] = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in table[key, home])
        return table[key, device]

    def rope(self, sliding: bool, device: torch.device):
        local = sliding and self.model.config.local_rope_theta is not None
        return self._per_device(self._rope, local, device,
                                lambda: self.model.rope(self.positions, local, self.dtype))

    def mask(self, sliding: bool, device: torch.device) -> tuple[int, torch.Tensor | str | None]:
        """(first key slot, mask): None when every key is visible, "causal" for a plain causal
        prefill, else an additive float mask [T, L] (0 visible, -inf hidden), built once per
        forward so that no layer converts a boolean mask again."""
        window = self.model.config.sliding_window if sliding else None
        return self._per_device(self._masks, window, device, lambda: self._build_mask(window))

    def _build_mask(self, window: int | None) -> tuple[int, torch.Tensor | str | None]:
        start, T, device = self.start, self.T, self.positions.device
        end = start + T
        # Prefix slots hold their own position, and every new token's position is >= start (a draft
        # tree's nodes: >= the first slot its mask covers, start - E), so slots below that minus
        # window - 1 are out of every query's window: skip them.
        first = start - (self.tree_mask.shape[1] - T if self.tree_mask is not None else 0)
        low = max(0, first - window + 1) if window else 0
        if self.tree_mask is None and T == 1 and not (window and end - low > window):
            return low, None
        if self.tree_mask is None and start == 0 and not (window and T > window):
            return low, "causal"
        key_slots = torch.arange(low, end, device=device)  # [L]
        if self.tree_mask is None:
            visible = key_slots[None, :] <= torch.arange(start, end, device=device)[:, None]  # [T, L]
        else:  # tree_mask [T, E + T] covers the last E + T slots (E > 0: earlier draft nodes, not all visible)
            extra = self.tree_mask.shape[1] - T
            if extra < 0 or start - extra < low:
                raise ValueError(f"tree mask {tuple(self.tree_mask.shape)} does not fit {T} new tokens at slot {start}")
            prefix = torch.ones(T, start - extra - low, dtype=torch.bool, device=device)
            visible = torch.cat((prefix, self.tree_mask.to(device=device, dtype=torch.bool)), dim=1)
        if window:
            key_positions = self.cache.positions[low:end]
            visible = visible & ((self.positions[:, None] - key_positions[None, :]) < window)
        hidden = torch.zeros(visible.shape, dtype=self.dtype, device=device)
        return low, hidden.masked_fill_(~visible, float("-inf"))
