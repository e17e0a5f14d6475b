"""Token trees for tree verification: one target forward scores many candidate continuations.

A tree has n nodes; node 0 is the root (the pending token, committed but not yet in the cache) and
every other node is a candidate token whose parent is an earlier node. One forward over all nodes,
each at position = prefix length + its depth and seeing only its ancestors (the tree mask), gives
the target's next-token logits after every node; the accepted path is then moved into place in
the KV cache (`compact`).

Trees are built from a list of paths of ranks (Medusa's named trees: path (0, 2) is the rank-2
candidate after the rank-0 one), or per step from the parents of scored candidates (a dynamic tree
as EAGLE-2 and Kangaroo's tree variant grow it). Nodes are ordered so that a parent comes before
its children and siblings come in rank order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tree:
    parents: torch.Tensor  # [n] parent node of each node; -1 for the root
    depth: torch.Tensor  # [n] the root 0
    rank: torch.Tensor  # [n] rank among its siblings (Medusa: the top-k rank at its depth); root 0
    mask: torch.Tensor  # [n, n] bool: node i sees node j (its ancestors and itself)
    leaf_paths: torch.Tensor  # [leaves, max_depth + 1] nodes root..leaf, padded with -1
    top_k: int  # candidates needed per depth: the largest rank + 1
    children: torch.Tensor  # [n, most children] each node's children in rank order, padded with -1

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def from_parents(cls, parents: list[int], rank: list[int] | None = None, device=None) -> "Tree":
        """A tree from each node's parent (node 0 the root, parent -1; parents before children),
        built on the host and moved to `device` once."""
        parents = [int(p) for p in parents]
        n = len(parents)
        if n == 0 or parents[0] != -1 or any(not 0 <= p < node for node, p in enumerate(parents) if node):
            raise ValueError("a tree needs node 0 as its root (parent -1) and every other parent before its child")
        depth, ancestors = [0] * n, [{0}] + [set() for _ in range(n - 1)]
        for node in range(1, n):  # parents come first, so theirs are complete
            depth[node] = depth[parents[node]] + 1
            ancestors[node] = ancestors[parents[node]] | {node}
        mask = [[j in ancestors[i] for j in range(n)] for i in range(n)]
        leaves = sorted(set(range(n)) - set(parents[1:]))
        leaf_paths = [[-1] * (max(depth) + 1) for _ in leaves]
        for row, leaf in enumerate(leaves):
            node = leaf
            while node >= 0:
                leaf_paths[row][depth[node]] = node
                node = parents[node]
        as_tensor = lambda values, dtype=torch.long: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        rank = [int(r) for r in rank] if rank is not None else [0] * n
        children: list[list[int]] = [[] for _ in range(n)]
        for node in range(1, n):
            children[parents[node]].append(node)
        for kids in children:
            kids.sort(key=lambda node: rank[node])
        width = max(1, max(map(len, children)))
        children = [kids + [-1] * (width - len(kids)) for kids in children]
        return cls(as_tensor(parents), as_tensor(depth), as_tensor(rank), as_tensor(mask, torch.bool),
                   as_tensor(leaf_paths), max(rank) + 1, as_tensor(children))

    @classmethod
    def from_paths(cls, paths: list[tuple[int, ...]], device=None) -> "Tree":
        """A tree from paths of ranks (every path's prefix is a path too); nodes by depth, then rank."""
        paths = sorted(set(map(tuple, paths)), key=lambda p: (len(p), p))
        known = set(paths)
        for path in paths:
            if not path or any(i < 0 for i in path) or (len(path) > 1 and path[:-1] not in known):
                raise ValueError(f"tree path {list(path)} is empty, negative or lacks its parent")
        index = {path: i + 1 for i, path in enumerate(paths)}
        parents = [-1] + [index[p[:-1]] if len(p) > 1 else 0 for p in paths]
        return cls.from_parents(parents, [0] + [p[-1] for p in paths], device)

    @classmethod
    def full(cls, size: int, width: int, device=None) -> "Tree":
        """`size` nodes, each with up to `width` children, filled breadth first (a profile's
        stand-in for a grown tree of that size)."""
        return cls.from_parents([-1] + [(node - 1) // width for node in range(1, size)], device=device)

    # ---- using ------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.parents.numel()

    @property
    def max_depth(self) -> int:
        return self.leaf_paths.shape[1] - 1

    def rank_paths(self) -> list[tuple[int, ...]]:
        """Each node's path of ranks from the root (the root's is empty): Medusa's tree notation."""
        parents, rank = self.parents.tolist(), self.rank.tolist()
        paths: list[tuple[int, ...]] = [()]
        for node in range(1, len(parents)):
            paths.append(paths[parents[node]] + (rank[node],))
        return paths

    def positions(self, start: int) -> torch.Tensor:
        """RoPE positions of the nodes when the root sits at position `start`."""
        return start + self.depth

    def longest_match(self, tokens: torch.Tensor, targets: torch.Tensor,
                      budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy acceptance, on the device: `tokens` [n] the nodes' tokens, `targets` [n] the
        target's choice after each node. Returns (the root-to-leaf path [max_depth + 1] whose prefix
        matches longest, the number of its nodes accepted after the root, at most `budget`)."""
        paths = self.leaf_paths  # [L, D + 1]
        valid = paths[:, 1:] >= 0
        children = tokens[paths[:, 1:].clamp(min=0)]  # [L, D]
        expected = targets[paths[:, :-1].clamp(min=0)]  # [L, D]: the target's token after each parent
        lengths = ((children == expected) & valid).int().cumprod(dim=1).sum(dim=1)  # [L]
        best = lengths.argmax()
        accepted = lengths[best]
        if budget is not None:
            accepted = accepted.clamp(max=budget)
        return paths[best], accepted

    @staticmethod
    def compact(cache, start: int, path: torch.Tensor, accepted: int) -> None:
        """Move the KV entries of the accepted nodes path[1..accepted] (written at slots start +
        node) right behind the root's slot `start`."""
        if accepted:
            cache.move(start + path[1:accepted + 1], start + 1)


# ---- growing a dynamic tree (EAGLE-2, Kangaroo's tree variant) -----------------------------------
@dataclass
class Grown:
    """A candidate grown while drafting: its token, parent (an index into the grown list; -1 the
    root), cumulative draft log-probability along its path, depth (1 = a child of the root), its
    own log-probability given its parent, and its path of tokens after the root."""
    token: int
    parent: int
    score: float
    depth: int
    own: float
    path: tuple[int, ...]


def grow(first: tuple[list[int], list[float]], expand, depth: int, top_k: int, total: int,
         expandable=None) -> tuple[list[int], list[int], list[Grown]]:
    """Grow a draft tree by cumulative draft probability and re-rank it to a verify budget.

    `first`: the root's top-k candidate tokens and their log-probabilities. Then at each depth
    2..`depth`, the `top_k` best frontier candidates (by cumulative log-probability, among those
    `expandable(grown)` allows) are expanded in one call `expand(chosen, grown, mask, block)`:
    `chosen` their indices into `grown`, `block` how many nodes were expanded before (their draft
    entries come first, in expansion order) and `mask` [k, block + k] bool which of those earlier
    nodes and chosen ones each chosen node sees (its expanded ancestors and itself). `expand`
    returns each chosen node's top-k children as (token rows, log-probability rows). Growth stops
    early when no frontier candidate may be expanded. Of everything grown, the best `total` - 1
    (ties: the shallower first, so a parent precedes its child) form the tree.

    Returns (parents, sibling ranks, kept): Tree.from_parents's arguments over the root and the
    kept candidates, and the kept Grown entries in node order (node i + 1 = kept[i])."""
    grown = [Grown(int(t), -1, float(s), 1, float(s), (int(t),)) for t, s in zip(*first)]
    frontier = list(range(len(grown)))
    expanded: list[int] = []  # the order of the drafter's entries for expanded nodes
    for _ in range(2, depth + 1):
        candidates = [node for node in frontier if expandable is None or expandable(grown[node])]
        chosen = sorted(candidates, key=lambda node: -grown[node].score)[:top_k]
        if not chosen:
            break
        slot_of = {node: i for i, node in enumerate(expanded)}
        block = len(expanded)
        mask = torch.zeros(len(chosen), block + len(chosen), dtype=torch.bool)
        for row, node in enumerate(chosen):
            mask[row, block + row] = True
            parent = grown[node].parent
            while parent >= 0:
                mask[row, slot_of[parent]] = True
                parent = grown[parent].parent
        token_rows, score_rows = expand(chosen, grown, mask, block)
        expanded += chosen
        frontier = []
        for node, tokens, scores in zip(chosen, token_rows, score_rows):
            parent = grown[node]
            for token, score in zip(tokens, scores):
                frontier.append(len(grown))
                grown.append(Grown(int(token), node, parent.score + float(score), parent.depth + 1, float(score),
                                   parent.path + (int(token),)))
    ranked = sorted(range(len(grown)), key=lambda node: (-grown[node].score, grown[node].depth))[:total - 1]
    kept = sorted(ranked, key=lambda node: (grown[node].depth, -grown[node].score))  # parents before children
    index = {node: i + 1 for i, node in enumerate(kept)}
    parents = [-1] + [0 if grown[node].parent < 0 else index[grown[node].parent] for node in kept]
    next_rank: dict[int, int] = {}
    rank = [0]
    for node in kept:
        parent = parents[index[node]]
        rank.append(next_rank.get(parent, 0))
        next_rank[parent] = rank[-1] + 1
    return parents, rank, [grown[node] for node in kept]


def verify_step(runtime, cache, context: int, tree: Tree):
    """A profile's tree verification: one target forward over `tree`'s nodes after a prefix of
    `context` tokens, with the tree's positions and mask, and the greedy token after each node."""
    nodes = torch.ones(1, tree.size, dtype=torch.long, device=runtime.device)
    return lambda: runtime.logits(runtime.forward_layers(runtime.embed(nodes), cache, context,
                                                         positions=tree.positions(context),
                                                         tree_mask=tree.mask)).argmax(-1)
