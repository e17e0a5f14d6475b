"""Acceptance rules: which drafted tokens a target forward accepts, and the token it adds after them.

Every rule works on the device and returns tensors, so that the core reads its outcome back once
per target forward (methods/core.py). The rules (DESIGN.md §4, "Decoding policy"):

- `Greedy` (temperature 0): a draft is accepted while it equals the target's argmax; the target's
  argmax follows. Lossless: the output is vanilla's token for token.
- `Exact(temperature, generator)`: speculative sampling that keeps the target's distribution
  p = softmax(logits / T) exactly.
  - A draft x drawn from a draft distribution q (Kangaroo's adapter, sampled at T) is accepted
    with probability min(1, p(x) / q(x)); at the first rejection the token is drawn from the
    residual norm(max(0, p - q)); after every draft is accepted, from p (Leviathan et al. 2023,
    Chen et al. 2023).
  - A deterministic draft (PLD, a tree's top-k children: Medusa, EAGLE-2) is the same rule with q
    the one-hot of x: accepted with probability p(x); on rejection p(x) is set to 0 and the rest
    renormalised, and the next sibling is tried on that residual; when every sibling fails, the
    token is drawn from what remains (SpecInfer's multi-round rule).
- `Typical(temperature, generator)`: Medusa's typical acceptance, accept x when
  p(x) > min(epsilon, delta * exp(-H(p))), the longest accepted branch wins and the next token
  is drawn from p after it. Not lossless (it changes the distribution); an explicit option,
  labelled "typical" in every report.

`ratio_accept` and `residual` are the two primitives the exact rule is made of; the distribution
tests (tests/test_sampling.py) enumerate the rule's branches through them.
"""
from __future__ import annotations

import torch

from methods.tree import Tree


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in float64 (the rule's arithmetic stays exact to ~1e-15)."""
    return torch.softmax(logits.double() / temperature, dim=-1)


def ratio_accept(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """min(1, p(x) / q(x)) for drafts x [...] with target and draft distributions p, q [..., V]."""
    px = p.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    qx = q.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    return torch.clamp(px / qx.clamp(min=1e-300), max=1.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dimension (p itself where nothing is left)."""
    rest = torch.clamp(p - q, min=0.0)
    total = rest.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp(min=1e-300), p)


def one_hot(x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(x, size).double()


def sample(distribution: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id (a 0-d tensor) drawn from `distribution` [V]."""
    return torch.multinomial(distribution.float(), 1, generator=generator)[0]


class Greedy:
    """Greedy decoding: the target's argmax decides; drafts are accepted while they equal it."""
    name = "greedy"
    exact = True

    def first(self, logits: torch.Tensor) -> torch.Tensor:
        """The token after the prompt from its logits [V] (ties go to the lowest id)."""
        return logits.argmax(dim=-1)

    def linear(self, logits: torch.Tensor, drafts: torch.Tensor,
               draft_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [1 + k, V] after the pending token and each of the k drafts. Returns (accepted
        drafts, the target's token after them), both 0-d tensors on the device."""
        targets = logits.argmax(dim=-1)  # [1 + k]
        accepted = (drafts == targets[:-1]).int().cumprod(dim=0).sum()
        return accepted, targets[accepted]

    def tree(self, tree: Tree, logits: torch.Tensor, tokens: torch.Tensor,
             budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [n, V] after each node of `tree`, whose tokens are [n]. Returns (root-to-leaf
        path [max_depth + 1] of the accepted branch, accepted nodes after the root (at most
        `budget`), the target's token after the last accepted node)."""
        targets = logits.argmax(dim=-1)  # [n]
        path, accepted = tree.longest_match(tokens, targets, budget)
        return path, accepted, targets[path[accepted]]


GREEDY = Greedy()


class Exact:
    """Lossless speculative sampling at temperature T > 0 (the module docstring has the rules)."""
    name = "exact"
    exact = True

    def __init__(self, temperature: float, generator: torch.Generator | None = None):
        if temperature <= 0:
            raise ValueError("sampling needs a temperature above 0 (0 is greedy decoding)")
        self.temperature, self.generator = temperature, generator

    def _uniform(self, count: int, device) -> torch.Tensor:
        return torch.rand(count, generator=self.generator, device=device, dtype=torch.float64)

    def first(self, logits: torch.Tensor) -> torch.Tensor:
        return sample(probabilities(logits, self.temperature), self.generator)

    def linear(self, logits: torch.Tensor, drafts: torch.Tensor,
               draft_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts [k] with their draft distributions [k, V] (None: deterministic drafts)."""
        p = probabilities(logits, self.temperature)  # [1 + k, V]
        k, vocab = drafts.numel(), p.shape[-1]
        q = one_hot(drafts, vocab) if draft_probs is None else draft_probs.double()  # [k, V]
        accept = self._uniform(k, p.device) < ratio_accept(p[:k], q, drafts)
        accepted = accept.int().cumprod(dim=0).sum()
        q_after = torch.cat((q, torch.zeros_like(p[:1])))  # [1 + k, V]: nothing drafted after the last
        return accepted, sample(residual(p[accepted], q_after[accepted]), self.generator)

    def tree(self, tree: Tree, logits: torch.Tensor, tokens: torch.Tensor,
             budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multi-round acceptance down the tree: at each accepted node its children are tried in rank
        order, each on the residual the rejected ones left; the walk stops where every child fails
        (the token comes from that residual), at a leaf or at the budget (from p)."""
        p = probabilities(logits, self.temperature)  # [n, V]
        vocab, device = p.shape[-1], p.device
        node = torch.zeros((), dtype=torch.long, device=device)
        stopped = torch.zeros((), dtype=torch.bool, device=device)
        final = p[0]
        path = [node]
        for _ in range(min(tree.max_depth, budget)):
            rest, moved, child_taken = p[node], torch.zeros_like(stopped), node
            uniforms = self._uniform(tree.children.shape[1], device)
            for j, child in enumerate(tree.children[node]):  # siblings in rank order
                valid = (child >= 0) & ~moved & ~stopped
                x = tokens[child.clamp(min=0)]
                target = one_hot(x, vocab)
                take = valid & (uniforms[j] < ratio_accept(rest, target, x))
                rest = torch.where(valid & ~take, residual(rest, target), rest)
                moved, child_taken = moved | take, torch.where(take, child, child_taken)
            final = torch.where(~stopped & ~moved, rest, final)
            stopped = stopped | ~moved
            node = torch.where(moved, child_taken, node)
            path.append(torch.where(moved, child_taken, torch.full_like(node, -1)))
        final = torch.where(stopped, final, p[node])  # reached a leaf's depth or the budget: from p there
        path = torch.stack(path)
        return path, (path[1:] >= 0).sum(), sample(final, self.generator)


class Typical(Exact):
    """Medusa's typical acceptance (lossy): x is accepted when p(x) > min(epsilon, delta·exp(-H(p)))."""
    name = "typical"
    exact = False

    def __init__(self, temperature: float, generator: torch.Generator | None = None, epsilon: float = 0.09,
                 delta: float = 0.3):
        super().__init__(temperature, generator)
        self.epsilon, self.delta = epsilon, delta

    def _typical(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(dim=-1)
        threshold = torch.clamp(self.delta * torch.exp(-entropy), max=self.epsilon)
        return p.gather(-1, x.unsqueeze(-1)).squeeze(-1) > threshold

    def linear(self, logits, drafts, draft_probs=None):
        p = probabilities(logits, self.temperature)
        accepted = self._typical(p[:drafts.numel()], drafts).int().cumprod(dim=0).sum()
        return accepted, sample(p[accepted], self.generator)

    def tree(self, tree, logits, tokens, budget):
        p = probabilities(logits, self.temperature)  # [n, V]
        node_ok = torch.ones_like(tokens, dtype=torch.bool)
        node_ok[1:] = self._typical(p[tree.parents[1:]], tokens[1:])  # each node's token under its parent
        paths = tree.leaf_paths
        lengths = (node_ok[paths[:, 1:].clamp(min=0)] & (paths[:, 1:] >= 0)).int().cumprod(dim=1).sum(dim=1)
        best = lengths.argmax()
        accepted = lengths[best].clamp(max=budget)
        path = paths[best]
        return path, accepted, sample(p[path[accepted]], self.generator)


def rule_for(temperature: float, generator: torch.Generator | None = None, accept: str = "exact"):
    """The acceptance rule of a decoding policy: greedy at T = 0 (typical acceptance included, as
    Medusa's own code does), else `accept` ("exact" or "typical") at T."""
    if temperature == 0:
        return GREEDY
    if accept == "typical":
        return Typical(temperature, generator)
    if accept != "exact":
        raise ValueError(f"unknown acceptance rule {accept!r}; valid: exact, typical")
    return Exact(temperature, generator)
