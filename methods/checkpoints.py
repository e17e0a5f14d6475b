"""Checkpoint folders of trained drafters (Kangaroo adapters, Medusa heads): ours and published.

Ours: `model.safetensors` (tensor names as the published formats) + `config.json` = {method,
base model alias and family, shapes, options, provenance}, optionally `vocab_ranking.safetensors`
(token ids by decreasing frequency, for `draft_vocab`). Loaders refuse missing, unexpected or
misshapen tensors with both shapes in the message; pickled published files are read with
`weights_only=True`, so they cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import torch

COMMITTED = Path(__file__).resolve().parent / "checkpoints"


def committed_checkpoint(alias: str | None, method: str) -> Path | None:
    """The checkpoint shipped in this repository for (model alias, method), if any."""
    if not alias:
        return None
    folder = COMMITTED / alias / method
    return folder if (folder / "config.json").is_file() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight file in a checkpoint folder (recorded in config.json of a run)."""
    return {f"{folder}/{p.name}": file_sha256(p) for p in sorted(folder.iterdir())
            if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file()}


def save(folder: Path, tensors: dict[str, torch.Tensor], config: dict,
         vocab_ranking: torch.Tensor | None = None) -> None:
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if vocab_ranking is not None:
        save_file({"ranking": vocab_ranking.to(torch.int64).contiguous()}, str(folder / "vocab_ranking.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def read_tensors(folder: Path, pickled_name: str) -> dict[str, torch.Tensor]:
    """model.safetensors if present, else the published pickle (`pickled_name`), read safely."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(folder / "model.safetensors"))
    pickled = folder / pickled_name
    if pickled.is_file():
        state = torch.load(pickled, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{pickled} does not hold a state dict")
        return state
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor {pickled_name}")


def read_vocab_ranking(folder: Path) -> torch.Tensor | None:
    path = folder / "vocab_ranking.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file
    return load_file(str(path))["ranking"]


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple], source: Path) -> None:
    """Refuse missing, unexpected or misshapen tensors, naming them and both shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
             for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing tensors {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {', '.join(unexpected)}")
    if wrong:
        problems.append("shapes that do not fit the model: " + "; ".join(wrong))
    if problems:
        raise ValueError(f"checkpoint {source} does not fit: " + " | ".join(problems))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
