"""Kangaroo: self-speculative decoding with double early exiting (Liu et al. 2024).

The draft model is the target's own first l layers, then an adapter (one attention block of the
target's kind without MLP, and one more norm), then the target's LM head. Drafting stops at the
second early exit: when the draft's top-1 probability falls below the threshold eta, or after
`steps` drafts. At temperature T > 0 the drafts are sampled from the adapter's distribution at T,
which the exact rule's ratio test then uses (methods/acceptance.py). The shallow layers' KV entries and features computed while drafting are kept, so
verification runs only layers [l, N) on the saved features, and the speculative core accepts the
longest prefix of drafts that matches the target's greedy tokens, plus the target's token after it.

`draft_vocab=N` scores drafts over the N most frequent tokens only (the LM head is 62% of the
embedded model); verification always uses the full vocabulary, so the output stays lossless.
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from methods import Generation, Option, ProfileTable, Sampling, StepCosts, acceptance, checkpoints, core, register
from methods.drafter import Drafter
from methods.runtime import DecoderLayer, RMSNorm, Transformer
from methods.tree import Grown, Tree, grow as grow_tree, verify_step
from methods.train import (TrainingJob, candidate_head, chain_acceptance, precompute_features,
                           soft_distillation_loss, teacher_distribution, token_batches, train_loop)

PUBLISHED_HINT = ("Pass an adapter folder with --method-args kangaroo:adapter=PATH or KANGAROO_ADAPTER=PATH (the "
                  "published Vicuna-7B adapter, Equationliu/Kangaroo: config.json + pytorch_model.bin, has no hub "
                  "id), or train one with `make train MODEL={model} METHOD=kangaroo` (on a GPU for Vicuna).")
TREE_PAPER_DEFAULTS = {"top_k": 10, "total_tokens": 60}  # the NeurIPS version's tree on Vicuna
TREE_CPU_DEFAULTS = {"top_k": 4, "total_tokens": 16}  # at most 16 verified tokens on the CPU path
DEFAULT_EXIT_LAYER = {"vicuna-13b": 3}  # else 2 (the paper's choice for Vicuna-7B)


class KangarooAdapter(nn.Module):
    """One attention block of the target's kind (no MLP) + a final norm: 4h² + 2h parameters for
    Llama. Tensor names follow the published adapter (`layers.0.self_attn.q_proj.weight`, ...)."""

    def __init__(self, model: Transformer):
        super().__init__()
        cfg = model.config
        self.layers = nn.ModuleList([DecoderLayer(cfg, with_mlp=False)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, plus_one=cfg.gemma)

    def expected_shapes(self) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def initialize_from(self, model: Transformer, layer: int) -> None:
        """Start from a copy of the target's layer `layer` attention and its final norm."""
        source = model.layers[layer]
        own = self.layers[0]
        own.self_attn.load_state_dict(source.self_attn.state_dict())
        own.input_layernorm.load_state_dict(source.input_layernorm.state_dict())
        self.norm.load_state_dict(model.norm.state_dict())
        nn.init.zeros_(own.self_attn.o_proj.weight)  # start as the identity: shallow exit -> final norm -> head


def load_adapter(folder: Path, model: Transformer) -> tuple[KangarooAdapter, dict]:
    """Our checkpoint (model.safetensors) or the published one (pytorch_model.bin); all tensors
    must be present with the model's shapes."""
    config = checkpoints.read_config(folder)
    state = checkpoints.read_tensors(folder, "pytorch_model.bin")
    adapter = KangarooAdapter(model).to(device=model.device, dtype=model.dtype)
    checkpoints.check_shapes(state, adapter.expected_shapes(), folder)
    adapter.load_state_dict(state, strict=True)
    return adapter, config


def random_adapter(model: Transformer) -> KangarooAdapter:
    """A seeded random adapter, for the tiny test models."""
    generator = torch.Generator().manual_seed(0)
    adapter = KangarooAdapter(model)
    for parameter in adapter.parameters():
        if parameter.dim() > 1:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.02
    return adapter.to(device=model.device, dtype=model.dtype)


@register("kangaroo")
class Kangaroo(Drafter):
    description = "Kangaroo self-speculative decoding: shallow layers + adapter draft, double early exit"
    options = {
        "adapter": Option(str, None, "checkpoint folder (ours or the published format); default: the committed one"),
        "exit_layer": Option(int, None, "l, layers the draft shares with the target (default: the checkpoint's, else 2)"),
        "threshold": Option(float, None, "eta: stop drafting when the draft's top-1 probability is below it "
                                         "(default: the checkpoint's recommended, else 0.6 as the paper)"),
        "steps": Option(int, None, "gamma: at most this many drafts per step (default: the checkpoint's "
                                   "recommended, else 6)"),
        "draft_vocab": Option(int, None, "score drafts over the N most frequent tokens only (0: full vocabulary; "
                                         "default: the checkpoint's recommended, else 0)"),
        "tree": Option(bool, False, "draft a dynamic tree (Kangaroo's NeurIPS variant): expand the top_k "
                                    "candidates of each depth by cumulative draft probability, each only while "
                                    "its own probability reaches threshold, for at most `steps` depths, and verify "
                                    "the best total_tokens in one tree forward"),
        "top_k": Option(int, None, "tree: children per expanded candidate and candidates expanded per depth "
                                   "(default: the checkpoint's recommended, else 10 on Vicuna, 4 elsewhere)"),
        "total_tokens": Option(int, None, "tree: tokens one verification scores, the pending one included "
                                          "(default: the checkpoint's recommended, else 60 on Vicuna, 16 elsewhere)"),
    }
    # kangaroo at its tuned defaults, the paper's full-vocabulary draft (a twin of the first where
    # that is the tuned default, and then skipped), and the tree variant
    default_sweep = ("kangaroo", "kangaroo+draft_vocab=0", "kangaroo+tree=true")
    checkpoint_option, checkpoint_env, missing_hint = "adapter", "KANGAROO_ADAPTER", PUBLISHED_HINT
    tuning_grid = tuple({"threshold": eta, "steps": steps, "draft_vocab": vocab}
                        for eta in (0.2, 0.4, 0.6) for steps in (4, 6) for vocab in (0, 32768))
    # the tree variant's own defaults (`bench tune --method kangaroo --variant tree`); its draft
    # vocabulary is the chain's tuned one. On the CPU a verification past ~8 tokens costs well over
    # a step, so the grid stays at small trees; on a GPU tune with a larger grid.
    variant_tuning_grids = {"tree": tuple({"threshold": eta, "steps": steps, "top_k": top_k, "total_tokens": total}
                                          for eta in (0.2, 0.4) for steps in (3, 4) for top_k in (2, 4)
                                          for total in (6, 8))}
    # threshold 0: an untrained adapter drafts at every step too, so verification of k tokens is exercised
    selftest_variants = ({}, {"threshold": 0.0}, {"tree": True, "threshold": 0.0})

    def __init__(self, model: Transformer, **options):
        super().__init__(model, **options)
        trained_exit = None
        if self.folder is not None:
            self.adapter, config = load_adapter(self.folder, model)
            trained_exit = config.get("options", {}).get("exit_layer", config.get("exit_layer"))
        else:
            self.adapter = random_adapter(model)
        self.recommend("threshold", 0.6)
        self.recommend("steps", 6)
        if self.settings["tree"]:
            self.recommend_tree(TREE_PAPER_DEFAULTS, TREE_CPU_DEFAULTS, depth_key="steps")
        elif self.settings["top_k"] is not None or self.settings["total_tokens"] is not None:
            raise ValueError("kangaroo: top_k and total_tokens shape the draft tree; add tree=true")
        self.exit_layer = self.settings["exit_layer"] or trained_exit or DEFAULT_EXIT_LAYER.get(model.alias or "", 2)
        self.settings["exit_layer"] = self.exit_layer
        if not 1 <= self.exit_layer < model.config.num_layers:
            raise ValueError(f"kangaroo: exit_layer must be in 1..{model.config.num_layers - 1}")
        if trained_exit and self.exit_layer != trained_exit:
            warnings.warn(f"kangaroo: the adapter was trained at exit layer {trained_exit}, used at {self.exit_layer}")
        self.ready(self.recommend("draft_vocab", 0))

    def trained_modules(self) -> list[nn.Module]:
        return [self.adapter]

    def propose(self, adapted: torch.Tensor, produced: int,
                sampling: Sampling | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The next draft from the adapter's output [1, 1, H], on the device: (the draft
        distribution's top-1 probability [1], token id [1, 1], the distribution q over the full
        vocabulary [V] when the token was sampled from it at temperature > 0, else None).
        `produced` is the index of that token among the new tokens (tests override this to feed
        oracle drafts)."""
        logits = self.head(self.adapter.norm(adapted))[0, -1].float()  # [V or draft_vocab]
        cap = self.model.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        temperature = sampling.temperature if sampling else 0.0
        q = torch.softmax(logits / (temperature or 1.0), dim=-1)
        probability, index = q.max(dim=-1)
        if temperature:
            index = acceptance.sample(q, sampling.generator)
        token = index if self.head_ids is None else self.head_ids[index]
        if not temperature:
            return probability.view(1), token.view(1, 1), None
        full = q if self.head_ids is None else torch.zeros(self.model.config.vocab_size, dtype=q.dtype,
                                                           device=q.device).index_copy_(0, self.head_ids, q)
        return probability.view(1), token.view(1, 1), full

    def candidates(self, adapted: torch.Tensor, paths: list[tuple[int, ...]],
                   produced: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tree drafting: the top_k next tokens and their draft log-probabilities [n, top_k] after
        each of n nodes whose adapter outputs are `adapted` [n, H]; `paths` are the nodes' draft
        tokens after the pending one and `produced` the tokens committed so far (tests override
        this to feed oracle drafts)."""
        logits = self.head(self.adapter.norm(adapted)[None])[0].float()  # [n, V or draft_vocab]
        cap = self.model.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        scores, index = torch.log_softmax(logits, dim=-1).topk(self.settings["top_k"], dim=-1)
        return (index if self.head_ids is None else self.head_ids[index]), scores

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int],
                 sampling: Sampling | None = None) -> Generation:
        if self.settings["tree"]:
            return self.generate_tree(prompt_ids, max_new_tokens, stop_ids, sampling)
        model = self.model
        shallow_layers, deep_layers = range(0, self.exit_layer), range(self.exit_layer, model.config.num_layers)
        gamma, threshold, block = self.settings["steps"], self.settings["threshold"], self.adapter.layers[0]
        state = core.start(prompt_ids, max_new_tokens, stop_ids, model.device, self.acceptance(sampling))
        needed = len(prompt_ids) + max_new_tokens + gamma + 2
        cache, adapter_cache = self.cache(needed), self.draft_cache("adapter", needed, num_layers=1)

        prompt = core.prompt_tensor(prompt_ids, model.device)
        shallow = model.forward_layers(model.embed(prompt), cache, 0, layers=shallow_layers)  # [1, P, H]
        model.forward_block(block, shallow, adapter_cache, 0)  # the adapter's KV for the prompt
        hidden = model.forward_layers(shallow, cache, 0, layers=deep_layers)
        core.commit_first(state, model.logits(hidden[:, -1:])[0, -1])
        while not state.done:
            budget = min(gamma, state.budget)
            features, drafts, draft_probs, token = [], [], [], state.pending
            while True:  # draft: shallow layers + adapter, one token at a time
                slot = state.length + len(drafts)
                feature = model.forward_layers(model.embed(token), cache, slot, layers=shallow_layers)  # [1, 1, H]
                features.append(feature)
                adapted = model.forward_block(block, feature, adapter_cache, slot)  # keeps the adapter's KV whole
                if len(drafts) >= budget:
                    break
                probability, token, q = self.propose(adapted, len(state.new_ids) + len(drafts), sampling)
                (confidence,) = core.read_back(probability, purpose="draft")
                if confidence < threshold:  # the second early exit
                    break
                drafts.append(token)
                draft_probs.append(q)
            # verify: the deep layers on the saved features of [pending, drafts...]
            hidden = model.forward_layers(torch.cat(features, dim=1), cache, state.length, layers=deep_layers)
            core.verify_linear(state, model.logits(hidden)[0], torch.cat(drafts).view(-1) if drafts else None,
                               torch.stack(draft_probs) if drafts and draft_probs[0] is not None else None)
        return state.result()

    def generate_tree(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int],
                      sampling: Sampling | None = None) -> Generation:
        """The tree variant. Each step runs the shallow layers and the adapter on the pending
        token (with the adapter catching up on the drafts accepted last step), grows a tree from
        its top_k candidates (methods.tree.grow: the chosen candidates of a depth go through the
        shallow layers and the adapter in one tree-masked forward), and verifies the tree with one
        forward of every layer over its nodes. Drafts are the top-k children, deterministic, so at
        T > 0 the multi-round rule accepts them."""
        model = self.model
        shallow_layers, deep_layers = range(0, self.exit_layer), range(self.exit_layer, model.config.num_layers)
        depth, top_k, total = self.settings["steps"], self.settings["top_k"], self.settings["total_tokens"]
        floor = math.log(self.settings["threshold"]) if self.settings["threshold"] > 0 else -math.inf
        block = self.adapter.layers[0]
        state = core.start(prompt_ids, max_new_tokens, stop_ids, model.device, self.acceptance(sampling))
        needed = len(prompt_ids) + max_new_tokens + max(total, 1 + (depth - 1) * top_k) + 2
        cache, adapter_cache = self.cache(needed), self.draft_cache("adapter", needed, num_layers=1)
        device = model.device

        prompt = core.prompt_tensor(prompt_ids, device)
        shallow = model.forward_layers(model.embed(prompt), cache, 0, layers=shallow_layers)
        model.forward_block(block, shallow, adapter_cache, 0)
        hidden = model.forward_layers(shallow, cache, 0, layers=deep_layers)
        core.commit_first(state, model.logits(hidden[:, -1:])[0, -1])
        behind = None  # shallow features [1, a, H] of last step's accepted drafts, not yet in the adapter's cache
        while not state.done:
            start, produced = state.length, len(state.new_ids)
            feature = model.forward_layers(model.embed(state.pending), cache, start, layers=shallow_layers)
            if behind is not None:
                feature = torch.cat((behind, feature), dim=1)
            adapted = model.forward_block(block, feature, adapter_cache, start + 1 - feature.shape[1])[0, -1:]
            first = core.read_back(torch.cat([part.float() for part in self.candidates(adapted, [()], produced)]),
                                   purpose="draft")

            def expand(chosen: list[int], grown: list[Grown], mask: torch.Tensor, done: int):
                # the chosen candidates through the shallow layers and the adapter, after the pending token's slot
                tokens = torch.tensor([[grown[node].token for node in chosen]], device=device)
                positions = torch.tensor([start + grown[node].depth for node in chosen], device=device)
                mask = mask.to(device)
                features = model.forward_layers(model.embed(tokens), cache, start + 1 + done, positions=positions,
                                                tree_mask=mask, layers=shallow_layers)
                out = model.forward_block(block, features, adapter_cache, start + 1 + done, positions=positions,
                                          tree_mask=mask)[0]
                rows = self.candidates(out, [grown[node].path for node in chosen], produced)
                return core.read_back(torch.stack([part.float() for part in rows]), purpose="draft")

            parents, rank, kept = grow_tree(first, expand, min(depth, max(state.budget, 1)), top_k, total,
                                            expandable=lambda node: node.own >= floor)
            tree = Tree.from_parents(parents, rank, device)
            nodes = torch.cat((state.pending.view(1), torch.tensor([node.token for node in kept], dtype=torch.long,
                                                                    device=device)))
            positions = tree.positions(start)
            shallow = model.forward_layers(model.embed(nodes[None]), cache, start, positions=positions,
                                           tree_mask=tree.mask, layers=shallow_layers)
            hidden = model.forward_layers(shallow, cache, start, positions=positions, tree_mask=tree.mask,
                                          layers=deep_layers)
            path, accepted = core.verify_tree(state, tree, model.logits(hidden)[0], nodes, cache)
            behind = shallow[:, path[1:accepted + 1]] if accepted else None
        return state.result()

    # ---- hooks read by bench/ ------------------------------------------------------------------
    @classmethod
    def profile(cls, runtime, cache, context, add):
        """One draft step (shallow layers, adapter, head) with the full and the 32k draft
        vocabulary, and the deep-layer verification of 1 + k tokens."""
        token = torch.ones(1, 1, dtype=torch.long, device=runtime.device)
        for draft_vocab in (0, 32768):
            kangaroo = cls(runtime, draft_vocab=draft_vocab)
            adapter_cache = kangaroo.draft_cache("adapter", cache.max_len, num_layers=1)
            shallow = range(0, kangaroo.exit_layer)

            def draft_step(kangaroo=kangaroo, adapter_cache=adapter_cache, shallow=shallow):
                feature = runtime.forward_layers(runtime.embed(token), cache, context, layers=shallow)
                adapted = runtime.forward_block(kangaroo.adapter.layers[0], feature, adapter_cache, context)
                return kangaroo.propose(adapted, 0)[:2]
            add("kangaroo_draft" + (f"_vocab{draft_vocab}" if draft_vocab else ""), 1, draft_step)
        tree_variant = cls(runtime, tree=True, draft_vocab=32768)  # the tree variant: one level, one verification
        top_k, total = tree_variant.settings["top_k"], tree_variant.settings["total_tokens"]
        tree_cache = tree_variant.draft_cache("adapter", cache.max_len, num_layers=1)
        tokens = torch.ones(1, top_k, dtype=torch.long, device=runtime.device)

        def tree_level(method=tree_variant, adapter_cache=tree_cache, shallow=range(0, tree_variant.exit_layer)):
            features = runtime.forward_layers(runtime.embed(tokens), cache, context, layers=shallow)
            adapted = runtime.forward_block(method.adapter.layers[0], features, adapter_cache, context)[0]
            return method.candidates(adapted, [()] * top_k, 0)
        add("kangaroo_tree_draft_vocab32768", top_k, tree_level)
        add("kangaroo_tree_verify", total, verify_step(runtime, cache, context, Tree.full(total, top_k, runtime.device)))
        deep = range(kangaroo.exit_layer, runtime.config.num_layers)
        for k in (1, 2, 4, 8, 16):
            hidden = torch.randn(1, k, runtime.config.hidden_size, dtype=runtime.dtype, device=runtime.device)
            add("kangaroo_verify", k, lambda hidden=hidden: runtime.logits(
                runtime.forward_layers(hidden, cache, context, layers=deep)).argmax(-1))

    train_options = {"exit_layer": Option(int, 2, "l: layers the draft shares with the target")}

    @classmethod
    def train(cls, job: TrainingJob) -> dict:
        """Soft distillation of a new adapter (or `job.resume`'s) onto the full model at the same
        position; evaluates held-out agreement and saves the checkpoint."""
        runtime, exit_layer, lr = job.runtime, job.options["exit_layer"], job.lr or 5e-4
        torch.manual_seed(job.seed)
        train_set = precompute_features(runtime, job.train, exit_layer, desc="features (train)")
        held_out = precompute_features(runtime, job.held_out, exit_layer, desc="features (held-out)")
        previous = None
        if job.resume is not None:
            adapter, previous = load_adapter(job.resume, runtime)
            trained_at = previous.get("options", {}).get("exit_layer")
            if trained_at != exit_layer:
                raise ValueError(f"{job.resume} was trained at exit layer {trained_at}, not {exit_layer}")
        else:
            adapter = KangarooAdapter(runtime).to(dtype=runtime.dtype)
            adapter.initialize_from(runtime, exit_layer)
            head, _ = candidate_head(runtime, job.ranking, job.candidates)
            factor = calibrate_norm(runtime, adapter, train_set.shallow[0], train_set.final[0], head)
            print(f"[train] adapter norm scaled by {factor:.3f} (the loss-minimizing start)", file=sys.stderr)
        report = train_adapter(runtime, adapter, train_set, held_out, job.ranking, job.candidates, job.minutes,
                               job.epochs, lr)
        evaluation = evaluate_adapter(runtime, adapter, held_out, job.ranking, job.candidates)
        objective = ("soft distillation -sum p log q onto the full model at the same position, over the "
                     f"{job.candidates} most frequent tokens")
        return job.save("kangaroo", adapter, {"exit_layer": exit_layer, "draft_vocab_trained": job.candidates},
                        objective, report, lr, train_set.tokens, held_out.tokens, evaluation, previous)

    @classmethod
    def step_costs(cls, profile: ProfileTable, options: dict) -> StepCosts | None:
        gamma, vocab = int(options.get("steps") or 0), options.get("draft_vocab") or 0
        draft = profile.ms("kangaroo_draft" + (f"_vocab{vocab}" if vocab else ""))
        if options.get("tree"):  # at full depth: the pending token, then steps - 1 levels of top_k
            top_k, total = int(options.get("top_k") or 0), int(options.get("total_tokens") or 0)
            level = profile.ms("kangaroo_tree_draft" + (f"_vocab{vocab}" if vocab else ""), top_k)
            verify = profile.ms("kangaroo_tree_verify", total) or profile.forward(total, extrapolate=False)
            if not gamma or draft is None or level is None or verify is None or profile.forward(1) is None:
                return None
            return StepCosts(gamma, profile.forward(1), draft + (gamma - 1) * level, verify)
        if not gamma or draft is None or profile.forward(1) is None:
            return None
        return StepCosts(gamma, profile.forward(1), gamma * draft, profile.forward(gamma + 1))


# ---- training -------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_norm(model: Transformer, adapter: KangarooAdapter, shallow: torch.Tensor, final: torch.Tensor,
                   head: torch.Tensor) -> float:
    """Scale the adapter's final norm by the factor (of a log grid) that minimizes the distillation
    loss on one sequence: a shallow exit through the final norm is confidently wrong over the
    whole vocabulary, and a student that starts nearer uniform learns faster. Returns the factor."""
    student = adapter_outputs(model, adapter, shallow)
    softcap = model.config.final_logit_softcapping
    teacher = teacher_distribution(final.to(student.device), head, softcap)
    factors = torch.logspace(-2, 0, 21).tolist()
    losses = [float(soft_distillation_loss(student * f, teacher, head, softcap)) for f in factors]
    factor = factors[losses.index(min(losses))]
    weight = adapter.norm.weight
    if adapter.norm.plus_one:  # Gemma: x̂ (1 + w)
        weight.copy_((1 + weight) * factor - 1)
    else:
        weight.mul_(factor)
    return factor


def adapter_outputs(model: Transformer, adapter: KangarooAdapter, shallow: torch.Tensor) -> torch.Tensor:
    """The adapter's normed output [T, H] over one sequence's shallow features [T, H] (causal)."""
    cache = model.new_cache(shallow.shape[0], num_layers=1)
    adapted = model.forward_block(adapter.layers[0], shallow[None].to(model.device, model.dtype), cache, 0)
    return adapter.norm(adapted)[0].float()


def train_adapter(model: Transformer, adapter: KangarooAdapter, train_set, held_out, ranking: torch.Tensor,
                  candidates: int = 32768, minutes: float = 50, max_epochs: float = 8, lr: float = 5e-4,
                  batch_tokens: int = 2048):
    """Soft distillation of the adapter onto the full model's distribution at the same position
    (-Σ p·log q over the `candidates` most frequent tokens), assistant positions only."""
    head, _ = candidate_head(model, ranking, candidates)
    softcap = model.config.final_logit_softcapping
    batches = token_batches(train_set.loss_masks, batch_tokens)
    adapter.train().requires_grad_(True)

    def step_loss(batch: int):
        losses, tokens = [], 0
        for index in batches[batch]:
            mask = train_set.loss_masks[index].to(model.device)
            student = adapter_outputs(model, adapter, train_set.shallow[index])[mask]
            teacher = teacher_distribution(train_set.final[index].to(model.device)[mask], head, softcap)
            losses.append(soft_distillation_loss(student, teacher, head, softcap) * int(mask.sum()))
            tokens += int(mask.sum())
        return torch.stack(losses).sum() / tokens, tokens

    sample = held_out.first(4096)  # the training curve: held-out top-1 agreement over the candidates
    report = train_loop(adapter, step_loss, len(batches), minutes, max_epochs, lr, desc="kangaroo",
                        evaluate=lambda: evaluate_adapter(model, adapter, sample, ranking,
                                                          candidates)["agreement_candidates"])
    adapter.eval().requires_grad_(False)
    return report


@torch.no_grad()
def evaluate_adapter(model: Transformer, adapter: KangarooAdapter, held_out, ranking: torch.Tensor,
                     candidates: int = 32768, thresholds=(0.0, 0.2, 0.4, 0.6, 0.8)) -> dict:
    """Held-out agreement with the full model's greedy token: top-1 over the full vocabulary and
    over the candidate vocabulary; per draft position (up to 6) the acceptance of a draft chain at
    eta = 0 (methods/train.py's chain_acceptance); and per threshold eta the share of positions
    whose draft probability reaches eta and how often those drafts are right."""
    head, head_ids = candidate_head(model, ranking, candidates)
    full_head = model.lm_head.weight.detach().float()
    right_full = right_candidates = total = 0
    probabilities, correct, full_hits = [], [], []
    for shallow, final, mask in zip(held_out.shallow, held_out.final, held_out.loss_masks):
        mask = mask.to(model.device)
        student = adapter_outputs(model, adapter, shallow)[mask]
        teacher_tokens = (final.to(model.device)[mask] @ full_head.T).argmax(-1)
        student_full = (student @ full_head.T)
        full_hits.append(student_full.argmax(-1) == teacher_tokens)
        right_full += int(full_hits[-1].sum())
        candidate_probs = torch.softmax(student @ head.T, dim=-1)
        top_probability, top_index = candidate_probs.max(-1)
        hit = head_ids[top_index] == teacher_tokens
        right_candidates += int(hit.sum())
        probabilities.append(top_probability)
        correct.append(hit)
        total += int(mask.sum())
    probabilities, correct = torch.cat(probabilities).cpu(), torch.cat(correct).cpu()
    sweep = {}
    for eta in thresholds:
        confident = probabilities >= eta
        sweep[str(eta)] = {"drafted": float(confident.float().mean()),
                           "right_when_drafted": float(correct[confident].float().mean()) if confident.any() else 0.0}
    return {"tokens": total, "agreement_full_vocab": right_full / max(total, 1),
            "agreement_candidates": right_candidates / max(total, 1),
            "per_position_eta0": [round(a, 4) for a in chain_acceptance(full_hits, 6)], "threshold_sweep": sweep}
