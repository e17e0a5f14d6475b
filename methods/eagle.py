"""EAGLE-2: a one-layer feature drafter that grows a dynamic draft tree (Li et al. 2024).

The drafter reads the embedding of token t + 1 and the target's top-layer feature of token t (its
final-normed hidden state, what the LM head reads), concatenated in that order as the published
EAGLE code does, through one projection (2h -> h, with bias), then one decoder layer of the target's kind without its input norm (as the published
EAGLE weights), and predicts the feature of token t + 1, which the target's LM head scores for
token t + 2. It keeps its own KV cache, one entry per committed position, and runs
autoregressively on its own predicted features while drafting.

Each step grows a tree from the pending token: the drafter's top-k tokens at depth 1; then, for
depth 2..`depth`, the top-k nodes of the previous depth by cumulative draft log-probability (the
sum along the path) are expanded in one drafter forward each, with a tree mask over their
ancestors, into top-k children each. Of all the nodes grown, the `total_tokens` - 1 best by
cumulative log-probability form the tree one target forward verifies (a node's ancestors score at
least as high as it does, so the set is closed under ancestors). The accepted path and the
target's token after it are committed; the drafter then catches up on the target's features of the
accepted tokens in one forward, whose last output starts the next tree. Verification is the shared
tree rule (methods/core.py), so decoding is lossless whatever the drafter proposes, greedy or at
temperature > 0.
"""
from __future__ import annotations

import torch
from torch import nn

from methods import Generation, Option, ProfileTable, Sampling, StepCosts, checkpoints, core, register
from methods.cache import AttentionContext
from methods.drafter import Drafter
from methods.products import Linear
from methods.runtime import DecoderLayer, Transformer
from methods.train import (TrainingJob, candidate_head, precompute_features, soft_distillation_loss,
                           teacher_distribution, token_batches, train_loop)
from methods.tree import Grown, Tree, grow as grow_tree, verify_step

VICUNA_DEFAULTS = {"depth": 6, "top_k": 10, "total_tokens": 60, "draft_vocab": 0}  # the EAGLE-2 paper's
CPU_DEFAULTS = {"depth": 4, "top_k": 4, "total_tokens": 16, "draft_vocab": 32768}  # at most 16 verified tokens


class EagleDrafter(nn.Module):
    """fc (2h -> h, bias) and one decoder layer of the target's kind whose input norm is the
    identity. Parameter names follow the published EAGLE files (`fc.weight`, `fc.bias`,
    `layers.0.self_attn.q_proj.weight`, ...; no `layers.0.input_layernorm.weight`)."""

    def __init__(self, model: Transformer):
        super().__init__()
        hidden = model.config.hidden_size
        self.fc = Linear(2 * hidden, hidden, bias=True)
        layer = DecoderLayer(model.config)
        layer.input_layernorm = nn.Identity()
        self.layers = nn.ModuleList([layer])


def random_drafter(model: Transformer) -> EagleDrafter:
    """A seeded random drafter (the tiny test models): the layer starts as the target's last one."""
    torch.manual_seed(0)
    drafter = EagleDrafter(model)
    nn.init.normal_(drafter.fc.weight, std=0.02)
    nn.init.zeros_(drafter.fc.bias)
    last = model.layers[-1].state_dict()
    drafter.layers[0].load_state_dict({k: v for k, v in last.items() if not k.startswith("input_layernorm")},
                                      strict=True)
    return drafter.to(device=model.device, dtype=model.dtype)


def initial_drafter(model: Transformer) -> EagleDrafter:
    """The starting point of a new drafter's training: it predicts that the next feature is the
    current one. fc passes the feature half through (identity), its embedding half and bias start
    at zero; the layer is a copy of the target's last layer that adds nothing until trained: its
    output projections (o_proj, down_proj) are zero, or on Gemma, whose post-attention and
    post-feedforward norms would rescale any non-zero output to full size, those norms' scales.
    Starting from the target's last layer as is puts the output on the residual stream's scale,
    hundreds of times the normed feature's on Gemma 3 (RMS ~1,400 against ~4), and training spends
    its first half hour shrinking it."""
    drafter = random_drafter(model)
    hidden = model.config.hidden_size
    with torch.no_grad():
        drafter.fc.weight[:, hidden:] = torch.eye(hidden, dtype=drafter.fc.weight.dtype)
        drafter.fc.weight[:, :hidden] = 0
        layer = drafter.layers[0]
        if model.config.gemma:  # its post-norms rescale any non-zero input to full size: zero their scale instead
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                norm.weight.fill_(-1.0 if norm.plus_one else 0.0)
        else:
            nn.init.zeros_(layer.self_attn.o_proj.weight)
            nn.init.zeros_(layer.mlp.down_proj.weight)
    return drafter


def drafter_forward(model: Transformer, drafter: EagleDrafter, features: torch.Tensor, tokens: torch.Tensor, cache,
                    start: int, positions: torch.Tensor | None = None,
                    tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The drafter over (feature of token t, token t + 1) pairs: features [1, T, H], tokens [1, T],
    written at slots [start, start + T) of its one-layer cache (global RoPE, no sliding window).
    Returns the predicted features [1, T, H]."""
    T = tokens.shape[1]
    if positions is None:
        positions = torch.arange(start, start + T, device=tokens.device)
    cache.positions[start:start + T] = positions
    x = drafter.fc(torch.cat((model.embed(tokens), features.to(model.dtype)), dim=-1))  # EAGLE's order
    context = AttentionContext(model, cache, start, T, positions, tree_mask, x.dtype)
    return model.layer_forward(drafter.layers[0], x, context, 0, sliding=False)


# What a published EAGLE file (yuhuili/EAGLE-Vicuna-7B-v1.3: config.json + pytorch_model.bin) may
# hold beyond the drafter: the target's own embedding (the drafter uses the target's) and the rotary
# table an older transformers saved as a buffer. Checked for shape, then dropped.
PUBLISHED_EXTRAS = ("embed_tokens.weight", "layers.0.self_attn.rotary_emb.inv_freq")


def load_drafter(folder, model: Transformer) -> tuple[EagleDrafter, dict]:
    """Our checkpoint (model.safetensors, the names of EagleDrafter) or a published EAGLE folder
    (pytorch_model.bin, read with weights_only): every drafter tensor must be present and of the
    right shape, and nothing else is accepted but PUBLISHED_EXTRAS (of the right shape). A
    published config with "bias": false has no fc.bias (a zero bias here)."""
    config = checkpoints.read_config(folder)
    state = dict(checkpoints.read_tensors(folder, "pytorch_model.bin"))
    drafter = EagleDrafter(model).to(device=model.device, dtype=model.dtype)
    expected = {k: tuple(v.shape) for k, v in drafter.state_dict().items()}
    cfg = model.config
    extras = {"embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
              "layers.0.self_attn.rotary_emb.inv_freq": (cfg.head_dim // 2,)}
    present = {k: v for k, v in extras.items() if k in state}
    if config.get("bias", True) is False and "fc.bias" not in state:
        state["fc.bias"] = torch.zeros(cfg.hidden_size)
    checkpoints.check_shapes(state, {**expected, **present}, folder)
    for key in present:
        del state[key]
    drafter.load_state_dict(state, strict=True)
    return drafter, config


@register("eagle2")
class Eagle2(Drafter):
    description = "EAGLE-2: one-layer feature drafter, dynamic draft tree, tree verification"
    options = {
        "drafter": Option(str, None, "checkpoint folder; default: the committed one"),
        "depth": Option(int, None, "draft tree depth (default: the checkpoint's, else 6 on Vicuna, 4 elsewhere)"),
        "top_k": Option(int, None, "children per expanded node and nodes expanded per depth (default: "
                                   "the checkpoint's, else 10 on Vicuna, 4 elsewhere)"),
        "total_tokens": Option(int, None, "tokens one verification scores, the pending one included (default: "
                                          "the checkpoint's, else 60 on Vicuna, 16 elsewhere)"),
        "draft_vocab": Option(int, None, "the drafter scores the N most frequent tokens only (default: the "
                                         "checkpoint's, else 0 on Vicuna, 32768 elsewhere)"),
    }
    checkpoint_option = "drafter"
    default_sweep = ("eagle2",)
    # on the CPU a verification past ~8 tokens costs well over a step (16-token trees lost at every
    # depth and top_k on the first drafter), so the grid stays at small trees
    tuning_grid = tuple({"depth": depth, "top_k": top_k, "total_tokens": total}
                        for depth in (3, 4) for top_k in (2, 3) for total in (6, 8, 10))
    # Not checked by the planted-bug suite: its best nodes come first in the tree, so an accepted
    # path is usually nodes 1..a, and a verification that writes one KV slot too late then leaves
    # behind exactly the entry the next step reads (the peaked tiny Gemma3 decodes 8 prompts in 10
    # identically under that bug). Its verification is the shared tree code that Medusa's planted
    # bugs do exercise.
    verifies_every_step = None
    missing_hint = "Pass --method-args eagle2:drafter=PATH, or train one with `make train MODEL={model} METHOD=eagle2`."

    def __init__(self, model: Transformer, **options):
        super().__init__(model, **options)
        if self.folder is not None:
            self.drafter, _ = load_drafter(self.folder, model)
        else:
            self.drafter = random_drafter(model)
        self.recommend_tree(VICUNA_DEFAULTS, CPU_DEFAULTS, depth_key="depth")
        self.ready(self.settings["draft_vocab"])

    def trained_modules(self) -> list[nn.Module]:
        return [self.drafter]

    # ---- the drafter --------------------------------------------------------------------------
    def draft_forward(self, features: torch.Tensor, tokens: torch.Tensor, cache, start: int,
                      positions: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """drafter_forward with this method's drafter."""
        return drafter_forward(self.model, self.drafter, features, tokens, cache, start, positions, tree_mask)

    def candidates(self, outputs: torch.Tensor, paths: list[tuple[int, ...]],
                   produced: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k next tokens and their draft log-probabilities [n, top_k] after each of n nodes
        whose predicted features are `outputs` [n, H]; `paths` are the nodes' draft tokens after the
        pending one and `produced` the tokens committed so far (tests override this to feed oracle
        drafts)."""
        logits = self.head(outputs[None])[0].float()  # [n, V']
        cap = self.model.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        scores, index = torch.log_softmax(logits, dim=-1).topk(self.settings["top_k"], dim=-1)
        return (index if self.head_ids is None else self.head_ids[index]), scores

    def grow(self, root: torch.Tensor, pending: int, start: int, cache, produced: int) -> tuple[Tree, torch.Tensor]:
        """The draft tree after the pending token: `root` [1, 1, H] the drafter's prediction of the
        pending token's feature, `start` the slot of the pending token (the drafter's cache holds
        [0, start)). Returns (the tree, its nodes' tokens [n], node 0 the pending token)."""
        tokens, scores = self.candidates(root[0], [()], produced)
        first = core.read_back(torch.cat((tokens.float(), scores)).view(2, -1), purpose="draft")
        outputs: dict[int, torch.Tensor] = {-1: root[0, 0]}  # each expanded node's predicted feature

        def expand(chosen: list[int], grown: list[Grown], mask: torch.Tensor, block: int):
            # a chosen node pairs its parent's predicted feature with its own token, at its parent's position
            features = torch.stack([outputs[grown[node].parent] for node in chosen])[None]  # [1, k, H]
            node_tokens = torch.tensor([[grown[node].token for node in chosen]], device=root.device)
            positions = torch.tensor([start + grown[node].depth - 1 for node in chosen], device=root.device)
            out = self.draft_forward(features, node_tokens, cache, start + block, positions,
                                     mask.to(root.device))[0]  # [k, H]
            for row, node in enumerate(chosen):
                outputs[node] = out[row]
            tokens, scores = self.candidates(out, [grown[node].path for node in chosen], produced)
            return core.read_back(torch.stack((tokens.float(), scores)), purpose="draft")

        parents, rank, kept = grow_tree(first, expand, self.settings["depth"], self.settings["top_k"],
                                        self.settings["total_tokens"])
        tree = Tree.from_parents(parents, rank, root.device)
        return tree, torch.tensor([pending] + [node.token for node in kept], device=root.device)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int],
                 sampling: Sampling | None = None) -> Generation:
        model = self.model
        depth, top_k, total = self.settings["depth"], self.settings["top_k"], self.settings["total_tokens"]
        state = core.start(prompt_ids, max_new_tokens, stop_ids, model.device, self.acceptance(sampling))
        needed = len(prompt_ids) + max_new_tokens + total + 1
        cache = self.cache(needed)
        draft_cache = self.draft_cache("drafter", needed + depth * top_k, num_layers=1)
        prompt = core.prompt_tensor(prompt_ids, model.device)
        hidden = model.forward_layers(model.embed(prompt), cache, 0)  # [1, P, H]
        features = model.norm(hidden)  # the target's features of the prompt tokens
        pending = core.commit_first(state, model.head_logits(features[0, -1]))
        # the drafter's entries for (feature t, token t + 1), t = 0 .. P - 1: the last pairs the pending token
        root = self.draft_forward(features, torch.cat((prompt[:, 1:], state.pending), dim=1), draft_cache, 0)[:, -1:]
        while not state.done:
            start = state.length
            tree, nodes = self.grow(root, pending, start, draft_cache, len(state.new_ids))
            hidden = model.forward_layers(model.embed(nodes[None]), cache, start,
                                          positions=tree.positions(start), tree_mask=tree.mask)  # [1, n, H]
            normed = model.norm(hidden[0])  # [n, H] the target's features of the nodes
            path, accepted = core.verify_tree(state, tree, model.head_logits(normed), nodes, cache)
            if state.done:
                break
            # the drafter catches up on the accepted nodes' target features, paired with the next tokens
            accepted_path = path[:accepted + 1]
            next_tokens = torch.cat((nodes[path[1:accepted + 1]], state.pending.view(1)))[None]
            root = self.draft_forward(normed[accepted_path][None], next_tokens, draft_cache, start)[:, -1:]
            (pending,) = state.new_ids[-1:]
        return state.result()

    # ---- hooks read by bench/ ------------------------------------------------------------------
    @classmethod
    def profile(cls, runtime, cache, context, add):
        """One drafter level over 1 and top_k nodes (drafter forward + its top-k over the draft
        vocabulary) and the tree verification of total_tokens nodes, at the defaults."""
        eagle = cls(runtime)
        top_k, total = eagle.settings["top_k"], eagle.settings["total_tokens"]
        draft_cache = eagle.draft_cache("drafter", cache.max_len, num_layers=1)
        for k in sorted({1, top_k}):
            features = torch.randn(1, k, runtime.config.hidden_size, dtype=runtime.dtype, device=runtime.device)
            tokens = torch.ones(1, k, dtype=torch.long, device=runtime.device)

            def level(features=features, tokens=tokens, k=k):
                out = eagle.draft_forward(features, tokens, draft_cache, context)[0]
                return eagle.candidates(out, [()] * k, 0)
            add("eagle2_draft", k, level)
        add("eagle2_verify", total, verify_step(runtime, cache, context, Tree.full(total, top_k, runtime.device)))

    @classmethod
    def step_costs(cls, profile: ProfileTable, options: dict) -> StepCosts | None:
        """At full depth: the root's candidates, depth - 1 levels of top_k nodes and the catch-up
        (about one level of one node), then one tree verification of total_tokens."""
        depth, top_k, total = (int(options.get(key) or 0) for key in ("depth", "top_k", "total_tokens"))
        one, level = profile.ms("eagle2_draft", 1), profile.ms("eagle2_draft", top_k)
        verify = profile.ms("eagle2_verify", total) or profile.forward(total)
        if not depth or one is None or level is None or verify is None or profile.forward(1) is None:
            return None
        return StepCosts(depth, profile.forward(1), 2 * one + (depth - 1) * level, verify)

    # ---- training ------------------------------------------------------------------------------
    train_options = {"token_weight": Option(float, 0.1, "weight of the token distillation loss next to the "
                                                        "feature regression (EAGLE: 0.1)")}

    @classmethod
    def train(cls, job: TrainingJob) -> dict:
        """Feature regression (smooth L1 onto the target's next feature) plus token distillation
        (-sum p log q onto the target's next distribution, over the candidate vocabulary), as the
        EAGLE papers; a new drafter starts as initial_drafter. Evaluates held-out
        acceptance per depth and saves the checkpoint."""
        runtime, lr = job.runtime, job.lr or 3e-4
        torch.manual_seed(job.seed)
        train_set = precompute_features(runtime, job.train, None, desc="features (train)")
        held_out = precompute_features(runtime, job.held_out, None, desc="features (held-out)")
        previous = None
        if job.resume is not None:
            drafter, previous = load_drafter(job.resume, runtime)
        else:
            drafter = initial_drafter(runtime)
        report = train_drafter(runtime, drafter, train_set, held_out, job.ranking, job.candidates, job.minutes,
                               job.epochs, lr, token_weight=job.options["token_weight"])
        evaluation = evaluate_drafter(runtime, drafter, held_out, job.ranking, job.candidates)
        objective = (f"smooth L1 onto the target's next feature + {job.options['token_weight']} x soft distillation "
                     f"onto its next distribution over the {job.candidates} most frequent tokens")
        return job.save("eagle2", drafter, {"draft_vocab_trained": job.candidates}, objective, report, lr,
                        train_set.tokens, held_out.tokens, evaluation, previous,
                        recommended={"draft_vocab": job.candidates})


def sequence_outputs(model: Transformer, drafter: EagleDrafter, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced drafter outputs over one sequence: from (feature t, token t + 1), t = 0..T-2,
    the predictions of features 1..T-1 [T - 1, H]."""
    T = ids.shape[0]
    cache = model.new_cache(T - 1, num_layers=1)
    out = drafter_forward(model, drafter, features[:-1][None].to(model.device), ids[1:][None].to(model.device), cache, 0)
    return out[0].float()


def train_drafter(model: Transformer, drafter: EagleDrafter, train_set, held_out, ranking: torch.Tensor,
                  candidates: int = 32768, minutes: float = 50, max_epochs: float = 8, lr: float = 3e-4,
                  batch_tokens: int = 2048, token_weight: float = 0.1):
    """The EAGLE loss at answer positions: position t (predicting feature t + 1) is trained when
    token t + 2 is an answer token (loss_mask[t + 1])."""
    head, _ = candidate_head(model, ranking, candidates)
    softcap = model.config.final_logit_softcapping
    batches = token_batches(train_set.loss_masks, batch_tokens)
    drafter.train().requires_grad_(True)

    def step_loss(batch: int):
        losses, tokens = [], 0
        for index in batches[batch]:
            final, ids = train_set.final[index], train_set.ids[index]
            mask = train_set.loss_masks[index][1:].to(model.device)
            if final.shape[0] < 2 or not mask.any():
                continue
            predicted = sequence_outputs(model, drafter, final, ids)[mask]  # [m, H]
            target = final[1:].to(model.device)[mask]
            feature_loss = nn.functional.smooth_l1_loss(predicted, target)
            token_loss = soft_distillation_loss(predicted, teacher_distribution(target, head, softcap), head, softcap)
            count = int(mask.sum())
            losses.append((feature_loss + token_weight * token_loss) * count)
            tokens += count
        return torch.stack(losses).sum() / max(tokens, 1), tokens

    sample = held_out.first(4096)  # the training curve: held-out depth-1 top-1 agreement
    report = train_loop(drafter, step_loss, len(batches), minutes, max_epochs, lr, desc="eagle2",
                        evaluate=lambda: evaluate_drafter(model, drafter, sample, ranking, candidates,
                                                          depths=1)["per_depth"][0])
    drafter.eval().requires_grad_(False)
    return report


@torch.no_grad()
def evaluate_drafter(model: Transformer, drafter: EagleDrafter, held_out, ranking: torch.Tensor,
                     candidates: int = 32768, depths: int = 4) -> dict:
    """Held-out acceptance per depth on the model's own answers, as decoding sees it: a chain
    starts after position t (context: the target's features up to t), drafts token t + 2 from
    (feature t, token t + 1), then token t + 1 + d from its own predicted feature and the target's
    token t + d, for d = 2..`depths`; each draft is its top-1 over the candidate vocabulary, right
    when it equals the target's greedy token. The chains of one depth run as one drafter forward
    (each chain's node seeing the true prefix up to its start and its own earlier nodes). Returns
    the tokens (chains started at answer positions) and, per depth d, chains right through d ÷
    chains right through d - 1 (vLLM's per-position acceptance)."""
    head, head_ids = candidate_head(model, ranking, candidates)
    full_head = model.lm_head.weight.detach().float()
    reached = [0] * (depths + 1)
    for final, ids, mask in zip(held_out.final, held_out.ids, held_out.loss_masks):
        T = ids.shape[0]
        if T < 3:
            continue
        final, ids = final.to(model.device), ids.to(model.device)
        greedy = (final @ full_head.T).argmax(-1)  # [T]: the target's token after each position
        n = T - 1  # chains start after positions 0..T-2
        chain = torch.arange(n, device=model.device)
        starts = mask[1:].to(model.device)  # the first draft is an answer token
        reached[0] += int(starts.sum())
        cache = model.new_cache(n * depths, num_layers=1)
        out = drafter_forward(model, drafter, final[:-1][None], ids[1:][None], cache, 0)[0]  # teacher-forced
        right = starts.clone()
        for depth in range(1, depths + 1):
            if depth > 1:  # every chain's next node: its own feature, the target's token t + depth
                block = n * (depth - 1)
                visible = torch.zeros(n, block + n, dtype=torch.bool, device=model.device)
                visible[:, :n] = chain[None, :] <= chain[:, None]  # the true prefix up to the chain's start
                for earlier in range(2, depth + 1):  # its nodes at depths 2..depth (this one included)
                    visible[chain, n * (earlier - 1) + chain] = True
                tokens = greedy[(chain + depth - 1).clamp(max=T - 1)]
                out = drafter_forward(model, drafter, out[None], tokens[None], cache, block,
                                      positions=chain + depth - 1, tree_mask=visible)[0]
            draft = head_ids[(out.float() @ head.T).argmax(-1)]
            target = greedy[(chain + depth).clamp(max=T - 1)]
            right &= (draft == target) & (chain + depth < T)
            reached[depth] += int(right.sum())
    per_depth = [round(reached[d + 1] / reached[d], 4) if reached[d] else 0.0 for d in range(depths)]
    return {"tokens": reached[0], "per_depth": per_depth}
