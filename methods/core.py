"""The speculative core every method decodes with: prefill, verify a linear draft, verify a tree,
and commit the accepted tokens with stop tokens and the token budget.

A method's loop reads like its paper's algorithm:

    state = core.start(prompt_ids, max_new_tokens, stop_ids, model.device, rule)
    logits = model.forward(prompt, cache, 0, last_only=True)
    core.commit_first(state, logits[0, -1])          # the prefill commits 1 token
    while not state.done:
        drafts = ...                                  # [k] on the device, k <= state.budget
        logits = model.forward(core.with_pending(state, drafts), cache, state.length)[0]
        core.verify_linear(state, logits, drafts)     # accepts, commits, advances

The acceptance rule is a parameter of the generation (methods/acceptance.py: greedy at temperature
0, exact speculative sampling or Medusa's typical acceptance above it). It runs on the device, and
each target forward reads its outcome back to the host once, through `read_back`: the accepted
count and the committed tokens in one transfer. Reads a method's own draft loop needs (Kangaroo's confidence exit) go
through `read_back` too, under purpose "draft", so they are counted apart.

`state.pending` is the last committed token as a [1, 1] tensor on the device, taken from the
rule's own output: the next forward's input never makes a round trip through a Python list.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from methods import Generation
from methods.acceptance import GREEDY
from methods.tree import Tree


def read_back(tensor: torch.Tensor, purpose: str = "verify") -> list:
    """The one place where decoding moves values from the device to the host (a sync on a GPU).
    `purpose`: "verify" (once per target forward) or "draft" (a method's own draft loop)."""
    return tensor.tolist()


# ---- the state of one generate() call -------------------------------------------------------------
@dataclass
class Decoding:
    """What one generation has committed so far (DESIGN.md §4's Generation fields included)."""
    max_new_tokens: int
    stops: frozenset[int]
    device: torch.device
    started: float
    rule: object = GREEDY  # an acceptance rule (methods/acceptance.py)
    length: int = 0  # cache slots holding committed tokens; `pending` goes to slot `length`
    pending: torch.Tensor | None = None  # [1, 1] the last committed token, not yet in the cache
    new_ids: list[int] = field(default_factory=list)
    accept_lengths: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)
    prefill_seconds: float | None = None

    @property
    def done(self) -> bool:
        return bool(self.new_ids) and (self.new_ids[-1] in self.stops or len(self.new_ids) >= self.max_new_tokens)

    @property
    def budget(self) -> int:
        """Drafts this step may accept: the target's own token always comes on top."""
        return self.max_new_tokens - len(self.new_ids) - 1

    def result(self) -> Generation:
        return Generation(self.new_ids, self.accept_lengths, self.draft_lengths, prefill_seconds=self.prefill_seconds)


def start(prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int], device: torch.device,
          rule=None) -> Decoding:
    """A new generation under acceptance `rule` (None: greedy); the clock for the time to the first
    token starts here."""
    return Decoding(max_new_tokens, frozenset(stop_ids), torch.device(device), time.perf_counter(),
                    rule=rule or GREEDY, length=len(prompt_ids))


def prompt_tensor(prompt_ids: list[int], device) -> torch.Tensor:
    return torch.tensor([prompt_ids], device=device)  # [1, P]


def with_pending(state: Decoding, drafts: torch.Tensor | None = None) -> torch.Tensor:
    """The tokens of a verification forward: [1, 1 + k] = the pending token, then the drafts."""
    if drafts is None or drafts.numel() == 0:
        return state.pending
    return torch.cat((state.pending, drafts.view(1, -1)), dim=1)


def until_stop(tokens: list[int], stops) -> list[int]:
    """`tokens` up to and including the first stop token."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1]
    return tokens


def commit(state: Decoding, committed: list[int], drafted: int, accepted: int, last: torch.Tensor) -> None:
    """Append one target forward's tokens (stopping at the first stop token), advance the cache
    length past the accepted drafts and the pending token, and make `last` ([] or [1]: the
    target's own token, on the device) the new pending token."""
    committed = until_stop(committed, state.stops)
    state.new_ids += committed
    state.accept_lengths.append(len(committed))
    state.draft_lengths.append(drafted)
    state.length += accepted + 1 if state.pending is not None else 0
    state.pending = last.view(1, 1)


def commit_first(state: Decoding, logits: torch.Tensor) -> int:
    """The prefill's token from the logits after the prompt [V]; it commits 1."""
    token = state.rule.first(logits)
    (value,) = read_back(token.view(1))
    commit(state, [value], 0, 0, token)
    state.prefill_seconds = time.perf_counter() - state.started
    return value


def verify_linear(state: Decoding, logits: torch.Tensor, drafts: torch.Tensor | None,
                  draft_probs: torch.Tensor | None = None) -> int:
    """Accept a linear draft: `logits` [1 + k, V] from the forward over with_pending(state, drafts),
    `drafts` [k] on the device (k <= state.budget), drawn from `draft_probs` [k, V] when the drafter
    samples (None: deterministic drafts). Commits and returns the accepted count."""
    if drafts is None:
        drafts = logits.new_empty(0, dtype=torch.long)
    accepted, token = state.rule.linear(logits, drafts, draft_probs)
    packed = read_back(torch.cat((accepted.view(1), drafts, token.view(1))))  # one transfer
    count = packed[0]
    commit(state, packed[1:1 + count] + [packed[-1]], drafts.numel(), count, token)
    return count


def verify_tree(state: Decoding, tree: Tree, logits: torch.Tensor, tokens: torch.Tensor,
                cache) -> tuple[torch.Tensor, int]:
    """Accept the best branch of a token tree: `logits` [n, V] from one forward over the nodes'
    `tokens` [n] (node 0 the pending token) at tree.positions(state.length) with tree.mask. Moves
    the accepted nodes' KV entries into place and commits. Returns (the branch's path of nodes
    [max_depth + 1], the accepted count)."""
    path, accepted, token = state.rule.tree(tree, logits, tokens, state.budget)
    packed = read_back(torch.cat((accepted.view(1), tokens[path.clamp(min=0)], token.view(1))))  # one transfer
    count = packed[0]
    tree.compact(cache, state.length, path, count)
    commit(state, packed[2:2 + count] + [packed[-1]], min(tree.max_depth, state.budget), count, token)
    return path, count
