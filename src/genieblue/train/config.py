"""Training configuration: one YAML file per run, with the paper's defaults for everything left out."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields
from difflib import get_close_matches
from pathlib import Path

import yaml


@dataclass
class DataSource:
    """A JSON / JSONL data file (LLaVA, ShareGPT or OpenAI format) and its share of the mixture (ratios are
    normalised)."""

    path: str
    ratio: float = 1.0
    image_folder: str | None = None


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
"""The plain kinds a field's annotation names, and the Python types that are of each (an int is a float)."""


def _of_kind(name: str, annotation: str, value):
    """`value`, refused when of another kind than a plain field's annotation names (`lr: fast`,
    `stage: "1"`) before it fails deep inside a run. A float written `2e-5` (a string to YAML 1.1,
    which wants `2.0e-5`) is read as the number. Fields of other annotations (lists, dicts, tuples) are
    checked where they are read."""
    parts = [part.strip() for part in annotation.split("|")]
    kinds = [_KINDS[part] for part in parts if part in _KINDS]
    if len(kinds) + ("None" in parts) != len(parts) or (value is None and "None" in parts):
        return value
    numeric = any(k in parts for k in ("int", "float"))
    if any(isinstance(value, kind) for kind in kinds) and not (numeric and isinstance(value, bool)):
        return value
    if "float" in parts and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    raise ValueError(f"{name} must be {' or '.join(parts)}, got {value!r}")


@dataclass
class TrainConfig:
    """One stage of one training run (`genieblue train -c FILE`, `Trainer(cfg)`): every field below,
    with the paper's defaults for what a file leaves out (docs/training.md lists them).

    Raises:
        ValueError: `stage` is not 1 or 2, or `batch_size`, `grad_accum`, `save_every` or
            `keep_last` is below 1.
    """

    # model
    llm: str | None = None  # None: the built-in SmolLM2-135M-Instruct
    vision: str | dict | None = None  # None: the demo's small from-scratch ResNet (model.DEFAULT_VISION)
    # tokens merged per side into one image token (None: a `vision` dict's `downsample`, 1 for the default tower's,
    # else 2; an odd grid needs 1)
    vision_downsample: int | None = None
    strategy: str = "genieblue-skip"
    fraction: float = 0.25
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # a saved model folder (e.g. stage 1's output) to continue from; only a stage-1 folder may start another
    # strategy or other settings of it (fraction, lora_rank, lora_alpha)
    init_from: str | None = None
    # data
    data: list[DataSource] = field(default_factory=list)
    max_tiles: int = 1  # dynamic resolution: up to N tiles + a thumbnail; 1 = single-patch mode
    # for training records without a system turn (None: the template's); after training, image requests only
    system_prompt: str | None = None
    max_length: int = 4096  # packing length
    max_bad_fraction: float = 0.01  # stop with an error when more records than this are bad
    # stage 0, run at the start of a fresh stage 1 (see `vision_pretrain`): a from-scratch tower (encoder, token
    # mixer, projector) learns to put each image's reply words into its tokens, in the LLM's embeddings
    # (0: off, for a pretrained encoder)
    stage0_steps: int = 0
    stage0_batch: int = 64
    stage0_lr: float = 3e-3
    stage0_match: float = 1.0  # weight of the cosine term that pulls each image token onto its target word's embedding
    # optimisation (paper defaults)
    stage: int = 2  # 1: connector only (token mixer + projector); 2: encoder + connector + copies/experts + LoRA
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 1  # packed sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 2e-5
    projector_lr: float | None = None  # the connector's (token mixer + projector) lr; default: lr
    # the encoder's lr above its blocks (default: lr); its block k from the top (ViT layer, backbone stage; k = 1
    # for the top one) trains at vit_lr * vit_layer_decay**k, its embeddings below them all one factor lower
    vit_lr: float | None = None
    vit_layer_decay: float = 0.9
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_ratio: float = 0.01
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: bf16 on a GPU or CPU with native bf16 matmuls, else fp32; or bf16 / fp16 / no
    gradient_checkpointing: bool = False
    # the LLM's attention while training (transformers' names; None: transformers' default, sdpa where the family
    # has it; inference keeps the default): sdpa; flex_attention (a GPU only: a packed row's samples attend within
    # themselves block by block, where sdpa computes the whole row's masked scores); eager; flash_attention_2
    # (batch_size 1 only)
    attn_implementation: str | None = None
    compile: bool = False  # torch.compile the blocks' attention and MLP on the image path (model.compile_blocks)
    device: str | None = None  # cpu or cuda (None: cuda when present; several processes: one GPU each)
    # bookkeeping
    output_dir: str = "runs/genieblue"
    save_every: int = 200
    keep_last: int = 2
    seed: int = 0

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, _of_kind(f.name, f.type, getattr(self, f.name)))
        self.data = _sources(self.data)
        self.betas = tuple(self.betas)
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        for name in ("batch_size", "grad_accum", "save_every", "keep_last", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        """The config a YAML file describes.

        Args:
            path: the YAML file; its data paths are relative to its folder.
            **overrides: fields to set over the file's (None leaves the file's value).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not YAML, not a mapping, a key that is not a field (the message lists the known
                ones and the likely typo), or a value `TrainConfig` refuses.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ValueError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config is a mapping of keys to values, such as `stage: 1`")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {_with_guesses(unknown, known)}; known keys: {sorted(known)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            config = cls(**raw)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        for source in config.data:  # data paths are relative to the config file
            for key in ("path", "image_folder"):
                value = getattr(source, key)
                if value and not Path(value).is_absolute():
                    setattr(source, key, str((path.parent / value).resolve()))
        return config

    def to_dict(self) -> dict:
        return asdict(self)


def _sources(data) -> list[DataSource]:
    """`data:` as DataSources; a one-line ValueError for anything else."""
    example = "data: lists sources such as `data: [{path: train.json, ratio: 1}]`"
    if data is None:
        return []
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"{example}; got {data!r}")
    known = [f.name for f in fields(DataSource)]
    sources = []
    for entry in data:
        if not isinstance(entry, DataSource):
            if not isinstance(entry, dict) or "path" not in entry:
                raise ValueError(f"{example}; got {entry!r} in it")
            unknown = sorted(set(entry) - set(known))
            if unknown:
                guessed = _with_guesses(unknown, known)
                raise ValueError(f"data: unknown keys {guessed} in {entry!r}; a source has {known}")
            entry = DataSource(**entry)
        sources.append(entry)
    return sources


def _with_guesses(unknown: list[str], known) -> str:
    """`unknown` keys, each with the known key it is likely a typo of."""
    guesses = {k: get_close_matches(k, known, n=1) for k in unknown}
    return ", ".join(repr(k) + (f" (did you mean {g[0]!r}?)" if g else "") for k, g in guesses.items())
