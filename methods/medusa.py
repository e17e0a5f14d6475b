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
from pathlib import Path

import torch
from torch import nn

from methods import (Generation, MissingCheckpoint, Option, ProfileTable, Sampling, StepCosts, checkpoints, core,
                     register)
from methods.acceptance import GREEDY, rule_for
from methods.drafter import Drafter
from methods.products import Linear
from methods.runtime import Transformer
from methods.train import (TrainingJob, candidate_head, precompute_features, soft_distillation_loss,
                           teacher_distribution, token_batches, train_loop)
from methods.tree import Tree, verify_step

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
    try:
        Tree.from_paths(paths)
    except ValueError as error:
        raise ValueError(f"tree {name_or_path}: {error}") from None
    return paths


def random_heads(model: Transformer, num_heads: int, share_lm_head: bool) -> nn.ModuleList:
    """Seeded random heads, for the tiny test models."""
    torch.manual_seed(0)
    heads = build_heads(model.config.hidden_size, model.config.vocab_size, num_heads, share_lm_head)
    for block in heads:
        nn.init.normal_(block[0].linear.weight, std=0.02)
    return heads.to(device=model.device, dtype=model.dtype)


@register("medusa")
class Medusa(Drafter):
    description = "Medusa-1 decoding heads with tree verification"
    options = {
        "heads": Option(str, None, "checkpoint folder (ours or the published format); default: the committed one"),
        "num_heads": Option(int, None, "use the first K heads (default: all heads of the checkpoint that the tree reaches)"),
        "tree": Option(str, None, "a named tree (mc_sim_7b_63, chain_4, ...) or a JSON file of paths "
                                  "(default: the checkpoint's, else mc_sim_7b_63)"),
        "share_lm_head": Option(bool, None, "heads score with the target's LM head (default: as the checkpoint holds)"),
        "draft_vocab": Option(int, None, "heads score the N most frequent tokens only (default: the checkpoint's, "
                                         "else 0 = full vocabulary)"),
        "accept": Option(str, "exact", "at temperature > 0: exact (lossless multi-round sampling) or typical "
                                       "(Medusa's typical acceptance, epsilon 0.09, delta 0.3; lossy)"),
    }
    default_sweep = ("medusa",)
    verifies_every_step = {}  # a whole tree every step
    checkpoint_option = "heads"
    missing_hint = "Pass --method-args medusa:heads=PATH, or train heads with `make train MODEL={model} METHOD=medusa`."
    tuning_grid = tuple({"tree": name} for name in ("chain_2", "chain_3", "chain_4", "small_7", "medium_15",
                                                      "mc_sim_7b_63"))

    def __init__(self, model: Transformer, **options):
        super().__init__(model, **options)
        settings = self.settings
        if self.folder is not None:
            self.heads, shared, _ = load_heads(self.folder, model)
        else:
            shared = True if settings["share_lm_head"] is None else settings["share_lm_head"]
            self.heads = random_heads(model, settings["num_heads"] or 4, shared)
        if settings["share_lm_head"] is not None and settings["share_lm_head"] != shared:
            raise ValueError(f"share_lm_head={settings['share_lm_head']} does not fit the checkpoint, which "
                             f"{'shares' if shared else 'holds its own'} LM heads")
        settings["share_lm_head"] = shared
        if settings["num_heads"] is not None:
            if not 1 <= settings["num_heads"] <= len(self.heads):
                raise ValueError(f"num_heads must be in 1..{len(self.heads)} for this checkpoint")
            self.heads = self.heads[:settings["num_heads"]]
        self.recommend("tree", "mc_sim_7b_63")
        self.recommend("draft_vocab", 0)
        self.tree = Tree.from_paths([p for p in read_tree(settings["tree"]) if len(p) <= len(self.heads)], model.device)
        self.node_head, self.node_rank = self.tree.depth[1:] - 1, self.tree.rank[1:]  # who proposes node i + 1
        # only the heads the tree reaches run (and count as overhead): a 4-deep tree on the published
        # 5-head file never computes the fifth head's 32000 x 4096 product
        self.heads = self.heads[:self.tree.max_depth]
        settings["num_heads"] = len(self.heads)
        if settings["accept"] not in ("exact", "typical"):
            raise ValueError(f"accept must be exact or typical, not {settings['accept']!r}")
        if settings["draft_vocab"] and not shared:
            raise ValueError("draft_vocab needs share_lm_head (heads with their own LM heads score the full vocabulary)")
        self.ready(settings["draft_vocab"] if shared else None)

    def acceptance(self, sampling: Sampling | None):
        return rule_for(sampling.temperature, sampling.generator, self.settings["accept"]) if sampling else GREEDY

    @classmethod
    def acceptance_name(cls, options: dict) -> str:
        return options.get("accept") or "exact"

    def published_checkpoint(self) -> Path | None:
        return fetch_published(self.model.alias) if self.model.alias in PUBLISHED else None

    def trained_modules(self) -> list[nn.Module]:
        return [self.heads]

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
        """Tokens of the tree nodes 1..n-1 [n - 1]; `produced` is the index among the new tokens of the
        token after the pending one (tests override this to feed oracle drafts)."""
        return self.candidates(normed)[self.node_head, self.node_rank]

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int],
                 sampling: Sampling | None = None) -> Generation:
        model, tree = self.model, self.tree
        state = core.start(prompt_ids, max_new_tokens, stop_ids, model.device, self.acceptance(sampling))
        cache = self.cache(len(prompt_ids) + max_new_tokens + tree.size + 1)
        hidden = model.forward_layers(model.embed(core.prompt_tensor(prompt_ids, model.device)), cache, 0)
        normed = model.norm(hidden[0, -1])  # [H]
        core.commit_first(state, model.head_logits(normed))
        while not state.done:
            nodes = torch.cat((state.pending.view(1), self.propose(normed, len(state.new_ids))))  # [n]
            hidden = model.forward_layers(model.embed(nodes[None]), cache, state.length,
                                          positions=tree.positions(state.length), tree_mask=tree.mask)  # [1, n, H]
            normed_nodes = model.norm(hidden[0])  # [n, H]
            path, accepted = core.verify_tree(state, tree, model.head_logits(normed_nodes[None])[0], nodes, cache)
            normed = normed_nodes[path[accepted:accepted + 1]][0]  # the last accepted node's state (no sync)
        return state.result()

    # ---- hooks read by bench/ ------------------------------------------------------------------
    PROFILED_TREES = ("chain_2", "chain_4", "small_7", "medium_15", "mc_sim_7b_63")

    @classmethod
    def profile(cls, runtime, cache, context, add):
        """The heads' draft step, and the tree verification of every shipped tree."""
        normed = runtime.norm(torch.randn(runtime.config.hidden_size, dtype=runtime.dtype, device=runtime.device))
        for name in cls.PROFILED_TREES:
            medusa = cls(runtime, tree=name)
            if name == cls.PROFILED_TREES[0]:
                add("medusa_draft", 1, lambda medusa=medusa: medusa.propose(normed, 0))
            add(f"medusa_verify_{name}", medusa.tree.size, verify_step(runtime, cache, context, medusa.tree))

    train_options = {"num_heads": Option(int, 4, "heads to train (head k predicts the token k + 1 ahead)")}

    @classmethod
    def train(cls, job: TrainingJob) -> dict:
        """Self-distillation of new heads sharing the model's LM head (or `job.resume`'s); evaluates
        held-out top-1/top-10 per head and saves the checkpoint."""
        runtime, lr = job.runtime, job.lr or 1e-3
        torch.manual_seed(job.seed)
        train_set = precompute_features(runtime, job.train, None, desc="features (train)")
        held_out = precompute_features(runtime, job.held_out, None, desc="features (held-out)")
        previous = None
        if job.resume is not None:
            heads, shared, previous = load_heads(job.resume, runtime)
            if not shared:
                raise ValueError(f"{job.resume} holds per-head LM heads; training here shares the model's LM head")
        else:
            heads = build_heads(runtime.config.hidden_size, runtime.config.vocab_size, job.options["num_heads"], True)
            heads.to(device=runtime.device, dtype=runtime.dtype)
        report = train_heads(runtime, heads, train_set, job.ranking, job.candidates, job.minutes, job.epochs, lr,
                             held_out=held_out)
        evaluation = evaluate_heads(runtime, heads, held_out, job.ranking, job.candidates)
        objective = ("self-distillation: head k learns the full model's distribution k positions later "
                     f"(-sum p log q over the {job.candidates} most frequent tokens, weight 0.8^k)")
        options = {"num_heads": len(heads), "share_lm_head": True, "draft_vocab_trained": job.candidates}
        return job.save("medusa", heads, options, objective, report, lr, train_set.tokens, held_out.tokens, evaluation,
                        previous, recommended={"draft_vocab": job.candidates})

    @classmethod
    def step_costs(cls, profile: ProfileTable, options: dict) -> StepCosts | None:
        gamma = int(options.get("num_heads") or 0)
        tree = options.get("tree")
        draft, verify = profile.ms("medusa_draft"), profile.ms(f"medusa_verify_{tree}")
        if verify is None and tree:  # a tree the profile does not time: a forward over its nodes, if profiled
            try:
                verify = profile.forward(len(read_tree(tree)) + 1, extrapolate=False)
            except ValueError:
                verify = None
        if not gamma or draft is None or verify is None or profile.forward(1) is None:
            return None
        return StepCosts(gamma, profile.forward(1), draft, verify)


# ---- training -------------------------------------------------------------------------------
def train_heads(model: Transformer, heads: nn.ModuleList, train_set, ranking: torch.Tensor, candidates: int = 32768,
                minutes: float = 30, max_epochs: float = 4, lr: float = 1e-3, batch_tokens: int = 2048,
                decay: float = 0.8, held_out=None):
    """Self-distillation of the heads (shared, frozen LM head): head k at position t learns the
    full model's distribution at position t + k (its prediction of token t + k + 1), over the
    `candidates` most frequent tokens; head k's loss is weighted decay**k, as Medusa-1."""
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

    evaluate = None
    if held_out is not None:  # the training curve: held-out top-1 of the first head
        sample = held_out.first(4096)
        evaluate = lambda: evaluate_heads(model, heads[:1], sample, ranking, candidates)["heads"][0]["top1"]
    report = train_loop(heads, step_loss, len(batches), minutes, max_epochs, lr, desc="medusa", evaluate=evaluate)
    heads.eval().requires_grad_(False)
    return report


@torch.no_grad()
def evaluate_heads(model: Transformer, heads: nn.ModuleList, held_out, ranking: torch.Tensor,
                   candidates: int = 32768, top_k: int = 10) -> dict:
    """Held-out top-1 and top-k agreement of head k with the full model's token at t + k + 1."""
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
