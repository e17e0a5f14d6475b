"""Tiny test models, built in code (no download): random ones, and peaked ones trained for seconds.

- `tiny-<family>-random`: 4 layers, hidden 64, a byte vocabulary, seeded random weights. Their
  next-token distributions are flat: in bfloat16 about 40% of positions have a top-2 gap within the
  half-precision near-tie tolerance (bench/lossless.py), so a bug there mostly looks like a tie.
- `tiny-<family>-peaked`: the same shapes trained for 300 steps (about 15 s on 2 CPU cores, cached
  on disk) on a synthetic language whose next letter is a fixed function of the two before it (85%
  of the time). Their greedy output follows that rule, every prediction depends on attending to
  the right earlier positions, and the distributions are peaked like a trained model's: the top-1
  logit stands out (relative top-2 gap above 0.18 at 99% of positions). They are what the
  half-precision lossless tests and `gpu-check` run on: a correct method must not be called
  `diverged` there, and a planted bug must be.
"""
from __future__ import annotations

import hashlib
import json
import sys

import torch

TINY_FAMILIES = ("llama", "qwen2", "gemma3")


class ByteTokenizer:
    """UTF-8 bytes as tokens, for the tiny test models (no download, no vocabulary file)."""
    pad_id, bos_id, eos_id, specials = 0, 1, 2, 4
    vocab_size = 256 + specials

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return [self.bos_id] * bos + [b + self.specials for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.specials for i in ids if self.specials <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id]


def tiny_hf_config(family: str, initializer_range: float | None = None):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config
    common = dict(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # Scales chosen so that greedy output of a random model varies instead of repeating one token.
    common["initializer_range"] = initializer_range or (0.02 if family == "gemma3" else 0.3)
    if family == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    return Gemma3TextConfig(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                            layer_types=["sliding_attention"] * 3 + ["full_attention"], **common)


def load_random(family: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(tiny_hf_config(family), dtype=torch.float32)
    return hf_model.to(device=device, dtype=dtype).eval(), ByteTokenizer()


# ---- the peaked models -------------------------------------------------------------------------
LETTERS = 26
FIRST_LETTER = ord("a") + ByteTokenizer.specials  # token id of "a"
RULE_SEED, NOISE = 1234, 0.15
RECIPE = {"steps": 300, "batch": 32, "length": 64, "lr": 3e-3, "initializer_range": 0.02, "rule_seed": RULE_SEED,
          "noise": NOISE, "seed": 0, "rule": "no a or b after a, b"}


def synthetic_rule() -> torch.Tensor:
    """RULE[a, b]: the letter after a, b (0-based letters). Never a or b, so the greedy text has no
    cycle of period 1 or 2, where reading one position off would go unnoticed."""
    rule = torch.randint(0, LETTERS - 2, (LETTERS, LETTERS), generator=torch.Generator().manual_seed(RULE_SEED))
    for a in range(LETTERS):  # skip over a and b: LETTERS - 2 choices mapped onto the other letters
        for b in range(LETTERS):
            value = int(rule[a, b])
            for excluded in sorted({a, b}):
                if value >= excluded:
                    value += 1
            rule[a, b] = value
    return rule


def synthetic_text(count: int, length: int, generator: torch.Generator, noise: float = NOISE) -> torch.Tensor:
    """[count, length] token ids of the synthetic language: two random letters, then each letter is
    synthetic_rule()[previous two] with probability 1 - noise, else a uniformly random letter."""
    rule = synthetic_rule()
    letters = torch.empty(count, length, dtype=torch.long)
    letters[:, :2] = torch.randint(0, LETTERS, (count, 2), generator=generator)
    for t in range(2, length):
        random_letters = torch.randint(0, LETTERS, (count,), generator=generator)
        letters[:, t] = torch.where(torch.rand(count, generator=generator) < noise, random_letters,
                                    rule[letters[:, t - 2], letters[:, t - 1]])
    return letters + FIRST_LETTER


def synthetic_prompts(count: int, length: int = 12, seed: int = 7) -> list[list[int]]:
    """Prompts for the peaked models: <bos> + `length` letters of the synthetic language."""
    text = synthetic_text(count, length, torch.Generator().manual_seed(seed))
    return [[ByteTokenizer.bos_id] + row.tolist() for row in text]


def _train_peaked(family: str):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(RECIPE["seed"])
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, RECIPE["initializer_range"]),
                                             dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=0.0)
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    steps = RECIPE["steps"]
    bos = torch.full((RECIPE["batch"], 1), ByteTokenizer.bos_id, dtype=torch.long)
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(steps):
            batch = torch.cat([bos, synthetic_text(RECIPE["batch"], RECIPE["length"], generator)], dim=1)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            for group in optimizer.param_groups:  # warm-up, then linear decay
                group["lr"] = RECIPE["lr"] * min(1.0, (step + 1) / 20) * (1 - step / steps)
    return model.eval()


def load_peaked(family: str, dtype: torch.dtype, device: torch.device, cache_folder):
    """The peaked tiny model of `family`: trained once (float32, on the CPU) and cached as
    safetensors under `cache_folder`, keyed by the recipe."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    key = hashlib.sha256(json.dumps({**RECIPE, "family": family}, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_folder / "peaked" / f"{family}-{key}.safetensors"
    if path.is_file():
        model = AutoModelForCausalLM.from_config(tiny_hf_config(family, RECIPE["initializer_range"]),
                                                 dtype=torch.float32)
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"{path} does not fit the tiny {family} model (missing {missing}, unexpected "
                             f"{unexpected}); delete it to train it again")
    else:
        print(f"[models] training the peaked tiny {family} model once (about 15 s; cached in {path.parent})",
              file=sys.stderr, flush=True)
        model = _train_peaked(family)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(path))
    return model.to(device=device, dtype=dtype).eval(), ByteTokenizer()
