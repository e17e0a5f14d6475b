"""Medusa-1: extra decoding heads on the last hidden state, verified as a token tree (Cai et al. 2024).

Head k (k = 1..K) is a ResBlock (x + SiLU(Wx + b), W zero-initialized) followed by an LM head (its
own copy, or the target's shared one); from the hidden state that produced the next token it
predicts the token k places after it. Each step, the top-k candidates of every head fill a sparse
candidate tree (a list of paths of top-k ranks, e.g. `mc_sim_7b_63`); one target forward over the
pending token and all tree nodes, with a tree attention mask and position = prefix length + depth,
scores every path; the path with the longest prefix matching the target's greedy tokens is
accepted, plus the target's token after it, and the accepted nodes' KV entries are moved into place.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from methods import Generation, Method, MissingCheckpoint, Option, Overhead, greedy, register
from methods import checkpoints
from methods.kangaroo import draft_head, random_fallback_allowed
from methods.runtime import Linear, Transformer, module_bytes, set_matmul_path

TREES = Path(__file__).resolve().parent / "trees"
PUBLISHED = {"vicuna-7b": "FasterDecoding/medusa-vicuna-7b-v1.3", "vicuna-13b": "FasterDecoding/medusa-vicuna-13b-v1.3",
             "vicuna-33b": "FasterDecoding/medusa-vicuna-33b-v1.3"}


class ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = Linear(hidden, hidden, bias=True)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


def build_heads(hidden: int, vocab: int, num_heads: int, share_lm_head: bool) -> nn.ModuleList:
    """Head h = Sequential(ResBlock, own LM head) as published (keys `{h}.0.linear.weight`,
    `{h}.0.linear.bias`, `{h}.1.weight`), or Sequential(ResBlock) when the LM head is shared."""
    heads = []
    for _ in range(num_heads):
        layers = [ResBlock(hidden)] + ([] if share_lm_head else [Linear(hidden, vocab, bias=False)])
        heads.append(nn.Sequential(*layers))
    return nn.ModuleList(heads)


def load_heads(folder: Path, model: Transformer) -> tuple[nn.ModuleList, bool, dict]:
    """Our checkpoint (model.safetensors) or the published `medusa_lm_head.pt`. The number of
    heads and whether each carries its own LM head are read from the tensor names, not the config
    (the published Vicuna-7B file holds 5 heads while its config says 2)."""
    config = checkpoints.read_config(folder)
    state = checkpoints.read_tensors(folder, "medusa_lm_head.pt")
    indices = sorted({int(key.split(".")[0]) for key in state if key.split(".")[0].isdigit()})
    if not indices or indices != list(range(len(indices))):
        raise ValueError(f"checkpoint {folder}: head tensors must be named 0.*, 1.*, ...; got {sorted(state)[:6]}")
    share = f"{indices[0]}.1.weight" not in state
    cfg = model.config
    heads = build_heads(cfg.hidden_size, cfg.vocab_size, len(indices), share).to(device=model.device, dtype=model.dtype)
    checkpoints.check_shapes(state, {k: tuple(v.shape) for k, v in heads.state_dict().items()}, folder)
    heads.load_state_dict(state, strict=True)
    return heads, share, config


def fetch_published(alias: str) -> Path:
    """Download the published heads for a Vicuna alias from the hub (machines that reach it)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(PUBLISHED[alias], allow_patterns=["config.json", "medusa_lm_head.pt"]))
    except Exception as error:  # noqa: BLE001  (offline, gated, ...)
        raise MissingCheckpoint(f"could not fetch the published Medusa heads {PUBLISHED[alias]} ({error}); "
                                f"download them and pass --method-args medusa:heads=PATH") from None


def read_tree(name_or_path: str) -> list[tuple[int, ...]]:
    """A tree as a list of paths of top-k ranks: a name in methods/trees/ or a JSON file
    ({"paths": [[0], [0, 0], [1], ...]} or a bare list)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = TREES / f"{name_or_path}.json"
    if not path.is_file():
        names = sorted(p.stem for p in TREES.glob("*.json"))
        raise ValueError(f"unknown tree {name_or_path!r}; named trees: {', '.join(names)} (or a JSON file path)")
    content = json.loads(path.read_text())
    paths = [tuple(int(i) for i in p) for p in (content["paths"] if isinstance(content, dict) else content)]
    known = set(paths)
    for p in paths:
        if not p or any(i < 0 for i in p) or (len(p) > 1 and p[:-1] not in known):
            raise ValueError(f"tree {name_or_path}: path {list(p)} is empty, negative or lacks its parent")
    return paths


@dataclass
class Tree:
    """Index tensors for one tree; node 0 is the root (the pending token), nodes 1..n the paths
    sorted by depth, then rank."""
    paths: list[tuple[int, ...]]
    depth: torch.Tensor  # [n + 1] root 0
    mask: torch.Tensor  # [n + 1, n + 1] bool: node i sees node j (ancestors and itself)
    head_of_node: torch.Tensor  # [n] which head (0-based) proposes node i + 1
    rank_of_node: torch.Tensor  # [n] its rank among that head's top-k
    leaf_paths: torch.Tensor  # [leaves, max_depth + 1] node indices root..leaf, padded with -1
    top_k: int

    @classmethod
    def build(cls, paths: list[tuple[int, ...]], device) -> "Tree":
        paths = sorted(set(paths), key=lambda p: (len(p), p))
        index = {p: i + 1 for i, p in enumerate(paths)}
        n = len(paths)
        mask = torch.eye(n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for p, i in index.items():
            for length in range(1, len(p)):
                mask[i, index[p[:length]]] = True
        leaves = [p for p in paths if not any(q[:len(p)] == p and len(q) == len(p) + 1 for q in paths)]
        longest = max(len(p) for p in paths)
        leaf_paths = torch.full((len(leaves), longest + 1), -1, dtype=torch.long)
        for row, leaf in enumerate(leaves):
            leaf_paths[row, 0] = 0
            for length in range(1, len(leaf) + 1):
                leaf_paths[row, length] = index[leaf[:length]]
        return cls(paths, torch.tensor([0] + [len(p) for p in paths], device=device), mask.to(device),
                   torch.tensor([len(p) - 1 for p in paths], device=device),
                   torch.tensor([p[-1] for p in paths], device=device), leaf_paths.to(device),
                   max(max(p) for p in paths) + 1)

    @property
    def max_depth(self) -> int:
        return self.leaf_paths.shape[1] - 1


def accept_path(tree: Tree, tokens: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Greedy acceptance: `tokens` [n + 1] tree tokens, `target` [n + 1] the target's argmax at each
    node. Returns (accepted node indices root..last accepted [j + 1], j)."""
    paths = tree.leaf_paths  # [L, D + 1]
    valid = paths[:, 1:] >= 0
    children = tokens[paths[:, 1:].clamp(min=0)]  # [L, D]
    predicted = target[paths[:, :-1].clamp(min=0)]  # [L, D]: the target's token after each parent
    matches = ((children == predicted) & valid).int().cumprod(dim=1)  # [L, D]
    lengths = matches.sum(dim=1)
    best = int(lengths.argmax())
    accepted = int(lengths[best])
    return paths[best, :accepted + 1], accepted


@register("medusa")
class Medusa(Method):
    description = "Medusa-1 decoding heads with tree verification"
    options = {
        "heads": Option(str, None, "checkpoint folder (ours or the published format); default: the committed one"),
        "num_heads": Option(int, None, "use the first K heads (default: all heads of the checkpoint)"),
        "tree": Option(str, None, "a named tree (mc_sim_7b_63, chain_4, ...) or a JSON file of paths "
                                  "(default: the checkpoint's, else mc_sim_7b_63)"),
        "share_lm_head": Option(bool, None, "heads score with the target's LM head (default: as the checkpoint holds)"),
        "draft_vocab": Option(int, None, "heads score the N most frequent tokens only (default: the checkpoint's, "
                                         "else 0 = full vocabulary)"),
    }

    def __init__(self, model: Transformer, **options):
        super().__init__(model, **options)
        self.checkpoints: dict[str, str] = {}
        cfg, settings = model.config, self.settings
        folder = Path(settings["heads"]) if settings["heads"] else checkpoints.committed_checkpoint(model.alias, "medusa")
        if folder is None and model.alias in PUBLISHED:
            folder = fetch_published(model.alias)
        if folder is None and not random_fallback_allowed(model):
            raise MissingCheckpoint(f"no Medusa heads for {model.alias}: pass --method-args medusa:heads=PATH or "
                                    f"train some with `make train MODEL={model.alias} METHOD=medusa`")
        recommended, ranking = {}, None
        if folder is not None:
            self.heads, shared, config = load_heads(folder, model)
            self.checkpoints = checkpoints.folder_hashes(folder)
            ranking = checkpoints.read_vocab_ranking(folder)
            recommended = config.get("recommended", {})
        else:
            warnings.warn(f"medusa: no heads for {model.alias or 'this model'}; using seeded random heads "
                          f"(lossless, but their drafts are rarely accepted). Train some with "
                          f"`python -m bench train --method medusa`.", stacklevel=2)
            shared = True if settings["share_lm_head"] is None else settings["share_lm_head"]
            torch.manual_seed(0)
            self.heads = build_heads(cfg.hidden_size, cfg.vocab_size, settings["num_heads"] or 4, shared)
            for block in self.heads:
                nn.init.normal_(block[0].linear.weight, std=0.02)
            self.heads.to(device=model.device, dtype=model.dtype)
        if settings["share_lm_head"] is not None and settings["share_lm_head"] != shared:
            raise ValueError(f"share_lm_head={settings['share_lm_head']} does not fit the checkpoint, which "
                             f"{'shares' if shared else 'holds its own'} LM heads")
        settings["share_lm_head"] = shared
        if settings["num_heads"] is not None:
            if not 1 <= settings["num_heads"] <= len(self.heads):
                raise ValueError(f"num_heads must be in 1..{len(self.heads)} for this checkpoint")
            self.heads = self.heads[:settings["num_heads"]]
        settings["num_heads"] = len(self.heads)
        settings["tree"] = settings["tree"] or recommended.get("tree", "mc_sim_7b_63")
        settings["draft_vocab"] = settings["draft_vocab"] if settings["draft_vocab"] is not None \
            else recommended.get("draft_vocab", 0)
        paths = [p for p in read_tree(settings["tree"]) if len(p) <= len(self.heads)]
        self.tree = Tree.build(paths, model.device)
        # only the heads the tree reaches run (and count as overhead): a 4-deep tree on the published
        # 5-head file never computes the fifth head's 32000 x 4096 product
        self.heads = self.heads[:self.tree.max_depth]
        settings["num_heads"] = len(self.heads)
        self.heads.requires_grad_(False).eval()
        set_matmul_path(self.heads, model.matmul)
        if settings["draft_vocab"] and ranking is None and model.vocab_ranking is not None:
            ranking = model.vocab_ranking()
        if shared:
            self.head, self.head_ids = draft_head(model, ranking, settings["draft_vocab"])
            if self.head_ids is None:
                settings["draft_vocab"] = 0  # as large as the model's vocabulary: the full one
        else:
            self.head, self.head_ids = None, None
            if settings["draft_vocab"]:
                raise ValueError("draft_vocab needs share_lm_head (heads with their own LM heads score the full vocabulary)")

    def overhead(self) -> Overhead:
        params = sum(p.numel() for p in self.heads.parameters())
        extra = module_bytes(self.heads)
        if self.head_ids is not None:
            extra += module_bytes(self.head)
        return Overhead(trained_params=params, extra_memory_bytes=extra)

    def candidates(self, normed: torch.Tensor) -> torch.Tensor:
        """The top-k token ids of every head from the normed hidden state [H]: [heads, top_k]."""
        states = torch.stack([block[0](normed) for block in self.heads])  # [K, H]
        if self.head is not None:
            logits = self.head(states[None])[0]  # [K, V'] one product for all heads
        else:
            logits = torch.stack([block[1](state) for block, state in zip(self.heads, states)])
        top = logits.topk(self.tree.top_k, dim=-1).indices  # [K, top_k]
        return top if self.head_ids is None else self.head_ids[top]

    def propose(self, normed: torch.Tensor, produced: int) -> torch.Tensor:
        """Tokens of the tree nodes 1..n; `produced` is the index among the new tokens of the token
        after the pending one (tests override this to feed oracle drafts)."""
        top = self.candidates(normed)
        return top[self.tree.head_of_node, self.tree.rank_of_node]

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> Generation:
        started = time.perf_counter()
        model, stops, tree = self.model, set(stop_ids), self.tree
        n = tree.depth.numel()
        cache = self.cache(len(prompt_ids) + max_new_tokens + n + 1)
        hidden = model.forward_layers(model.embed(torch.tensor([prompt_ids], device=model.device)), cache, 0)
        normed = model.norm(hidden[0, -1])  # [H]
        pending = int(greedy(model.lm_head(normed)))
        prefill_seconds = time.perf_counter() - started
        length = len(prompt_ids)  # slots filled; `pending` goes to slot `length`
        new_ids, accept_lengths, draft_lengths = [pending], [1], [0]
        while pending not in stops and len(new_ids) < max_new_tokens:
            budget = max_new_tokens - len(new_ids) - 1
            nodes = torch.cat((torch.tensor([pending], device=model.device), self.propose(normed, len(new_ids))))
            hidden = model.forward_layers(model.embed(nodes[None]), cache, length, positions=length + tree.depth,
                                          tree_mask=tree.mask)  # [1, n, H]
            normed_nodes = model.norm(hidden[0])  # [n, H]
            target = greedy(model.lm_head(normed_nodes[None])[0])  # [n]
            path, accepted = accept_path(tree, nodes, target)
            accepted = min(accepted, budget)
            path = path[:accepted + 1]
            committed = nodes[path[1:]].tolist() + [int(target[path[-1]])]
            for i, token in enumerate(committed):
                if token in stops:
                    committed = committed[:i + 1]
                    break
            if accepted:  # the accepted nodes' KV entries move behind the root
                cache.move(length + path[1:], length + 1)
            length += accepted + 1
            normed = normed_nodes[path[-1]]
            new_ids += committed
            accept_lengths.append(len(committed))
            draft_lengths.append(min(tree.max_depth, budget))
            pending = committed[-1]
        return Generation(new_ids, accept_lengths, draft_lengths, prefill_seconds=prefill_seconds)


# ---- training -------------------------------------------------------------------------------
def train_heads(model: Transformer, heads: nn.ModuleList, train_set, ranking: torch.Tensor, candidates: int = 32768,
                minutes: float = 30, max_epochs: float = 4, lr: float = 1e-3, batch_tokens: int = 2048,
                decay: float = 0.8):
    """Self-distillation of the heads (shared, frozen LM head): head k at position t learns the
    full model's distribution at position t + k (its prediction of token t + k + 1), over the
    `candidates` most frequent tokens; head k's loss is weighted decay**k, as Medusa-1."""
    from methods.train import (candidate_head, soft_distillation_loss, teacher_distribution, token_batches,
                               train_loop)
    head, _ = candidate_head(model, ranking, candidates)
    softcap = model.config.final_logit_softcapping
    batches = token_batches(train_set.loss_masks, batch_tokens)
    heads.train().requires_grad_(True)
    weights = [decay ** k for k in range(len(heads))]

    def step_loss(batch: int):
        total, tokens = 0.0, 0
        for index in batches[batch]:
            final = train_set.final[index].to(model.device, torch.float32)  # [T, H]
            mask = train_set.loss_masks[index].to(model.device)
            teacher = teacher_distribution(final, head, softcap)  # [T, V'], shared by every head
            tokens += int(mask.sum())
            for k, block in enumerate(heads):
                shift = k + 1  # head k (0-based) predicts what the model predicts `shift` positions later
                if final.shape[0] <= shift:
                    continue
                rows = mask[shift:]  # the predicted token t + shift + 1 is an assistant token
                if not rows.any():
                    continue
                student = block[0](final[:-shift][rows].to(model.dtype)).float()
                total = total + weights[k] * soft_distillation_loss(student, teacher[shift:][rows], head, softcap) \
                    * int(rows.sum())
        return total / max(tokens, 1), tokens

    report = train_loop(heads.parameters(), step_loss, len(batches), minutes, max_epochs, lr, desc="medusa")
    heads.eval().requires_grad_(False)
    return report


@torch.no_grad()
def evaluate_heads(model: Transformer, heads: nn.ModuleList, held_out, ranking: torch.Tensor,
                   candidates: int = 32768, top_k: int = 10) -> dict:
    """Held-out top-1 and top-k agreement of head k with the full model's token at t + k + 1."""
    from methods.train import candidate_head
    head, head_ids = candidate_head(model, ranking, candidates)
    full_head = model.lm_head.weight.detach().float()
    results = []
    for k, block in enumerate(heads):
        shift, top1, topk, total = k + 1, 0, 0, 0
        for final, mask in zip(held_out.final, held_out.loss_masks):
            final, mask = final.to(model.device, torch.float32), mask.to(model.device)
            if final.shape[0] <= shift or not mask[shift:].any():
                continue
            rows = mask[shift:]
            teacher = (final[shift:][rows] @ full_head.T).argmax(-1)
            scores = block[0](final[:-shift][rows].to(model.dtype)).float() @ head.T
            ranked = head_ids[scores.topk(top_k, dim=-1).indices]
            top1 += int((ranked[:, 0] == teacher).sum())
            topk += int((ranked == teacher[:, None]).any(-1).sum())
            total += int(rows.sum())
        results.append({"head": k + 1, "top1": top1 / max(total, 1), f"top{top_k}": topk / max(total, 1),
                        "tokens": total})
    return {"heads": results}
