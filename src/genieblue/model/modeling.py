"""`GenieBlueForConditionalGeneration`: a frozen HF causal LM plus a vision tower and a small
trainable delta, with the non-shared base inference of the paper.

Text-only requests run the untouched LLM (`self.llm`, called with `input_ids` exactly as the base
would be), so logits and greedy tokens equal the base model's bit for bit. Requests with an image
run the multimodal path: image embeddings are spliced in at placeholder positions
(`IMAGE_TOKEN_INDEX`, a negative id as in LLaVA, so the base vocabulary is never resized) and the
router switches copies, experts and LoRA on. `save_pretrained` writes only the delta.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from .._io import atomic_dir, write_json, writes_files
from .card import write_card
from .fingerprint import FILES_SCHEME, files_fingerprint, remember_match, remembered_match, tensors_fingerprint
from .folder import DELTA, MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, TRAINING, read_manifest
from .placement import resolve_placement
from .report import parameter_report
from .routing import Expert, LoRALinear, Router, Switch, delta_members, group_siblings, swap_modules
from .sources import base_files, check_llm_type, fingerprint, load_llm, load_vision, local_or_hub
from .strategy import EXPERT_TARGETS, Strategy
from .vision import VisionTower, split_tower_options

IMAGE_TOKEN_INDEX = -200
"""Placeholder id for one image token in `input_ids` (never embedded: replaced by image features)."""

DEFAULT_VISION = {
    "model_type": "resnet",
    "image_size": 64,
    "embedding_size": 16,
    "hidden_sizes": [32, 64, 128],
    "depths": [1, 1, 1],
    "layer_type": "basic",
    "out_features": ["stage3"],
    "downsample": 1,
    "mix_tokens": True,
}
"""The from-scratch tower of the demo: a small transformers ResNet (AutoBackbone) whose 4x4 stride-16
feature map at 64 px gives 16 image tokens, mixed across the tile. Convolutions learn shapes, counts
and glyphs from scratch in a few hundred steps where a ViT of the same cost does not (see README)."""


VISION_PREFIX = "vision."  # state-dict keys of the vision tower and connector


def _refuse_placeholders(placeholders: int) -> None:
    if placeholders:
        raise ValueError(f"input_ids hold {placeholders} image placeholder tokens but no pixel_values were given")


def _load_base(llm: str | PreTrainedModel | None, dtype: torch.dtype, device, weights: bool = True):
    """(base model, its spec, its fingerprint). The fingerprint is a function, called when it is first
    needed: files already on disk are fingerprinted on a second thread from the start (a first load
    hashes them while the base, tower and delta load; later loads find their digests cached; the
    callers await it before they return), a model object's and a structure's (`weights=False`) when
    called."""
    if isinstance(llm, PreTrainedModel):
        check_llm_type(llm.config)
        return llm, llm.name_or_path, lambda: fingerprint(None, llm)
    llm = local_or_hub(llm)
    if not weights:  # a structure: named by its files when asked (rank 0 may still be fetching them)
        return load_llm(llm, dtype, device, weights), llm, lambda: fingerprint(llm)
    files = base_files(llm)
    if not files:  # a hub id downloaded by the load
        return load_llm(llm, dtype, device), llm, lambda: fingerprint(llm)
    pool = ThreadPoolExecutor(1)
    pending = pool.submit(files_fingerprint, files)
    pool.shutdown(wait=False)  # the hash goes on; `pending.result` waits for it
    return load_llm(llm, dtype, device), llm, pending.result


def _structure_only(on: bool):
    """With `on`, what is built inside has its structure only, for a process of a sharded run that takes
    rank 0's weights (FSDP2's `cpu_ram_efficient_loading`): no weight file is read and no memory is
    taken; every parameter is on the meta device, and buffers are real (those no checkpoint holds,
    such as rotary frequencies, computed as usual). Tied weights are tied again after it (inside, each
    parameter assigned is given a meta one of its own)."""
    return init_empty_weights(include_buffers=False) if on else contextlib.nullcontext()


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor shard of a sharded model (FSDP2) is all-gathered (every rank must call)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class GenieBlueForConditionalGeneration(nn.Module):
    """A multimodal LLM whose base LLM weights are frozen and shared with text-only inference."""

    def __init__(
        self,
        llm: PreTrainedModel,
        vision: VisionTower,
        strategy: Strategy,
        base_spec: str,
        base_fingerprint: str | Callable[[], str],
        shared_base: bool = False,
        empty_delta: bool = False,
    ):
        """`base_fingerprint`: the base's (see `fingerprint`), or a function computing it when first
        needed (a model object with no files behind it is hashed only if it is saved). `empty_delta`:
        the LLM delta's parameters without data (meta), for a saved delta loaded in their place."""
        super().__init__()
        if next(delta_members(llm), None) is not None:
            raise ValueError("this LLM already carries a GenieBlue delta (it is another model's): pass a fresh base")
        self.llm = llm
        self.vision = vision
        self.strategy = strategy
        self.base_spec = base_spec
        self._base_fingerprint = base_fingerprint
        self.shared_base = shared_base
        self.router = Router()
        llm.requires_grad_(False)
        self._install_delta(empty_delta)
        llm.model.register_forward_pre_hook(self.router.begin_forward)
        self.set_stage(2)

    # construction ---------------------------------------------------------------------------
    @classmethod
    def from_base(
        cls,
        llm: str | PreTrainedModel | None = None,
        vision: str | dict | None = None,
        strategy: str | Strategy = "genieblue-skip",
        dtype: torch.dtype | str = torch.float32,
        shared_base: bool = False,
        downsample: int | None = None,
        device: torch.device | str = "cpu",
        weights: bool = True,
        **strategy_options,
    ) -> GenieBlueForConditionalGeneration:
        """Build a fresh model (its delta untrained) around a frozen base LLM.

        Args:
            llm: the base: a hub id, a folder, a .gguf file, None for the built-in SmolLM2-135M-Instruct,
                or a loaded `transformers` causal LM (used as it is, on its own device and dtype).
            vision: the encoder: a SigLIP / CLIP / AutoBackbone hub id or folder, or a config dict for a
                new one (it may also hold the tower's `downsample` and `mix_tokens`); None: `DEFAULT_VISION`.
            strategy: a `Strategy` or one of `STRATEGIES`; `strategy_options` (fraction, lora_rank, ...)
                go to `Strategy` with a name.
            dtype, device: where the base and tower are loaded (default float32 on the CPU, the
                master weights training wants); a torch dtype or a name such as "bfloat16".
            shared_base: send text-only inputs through the multimodal path too (the paper's ablation).
            downsample: merge downsample x downsample tokens into one image token (1: none, for a
                patch grid of odd side such as SigLIP so400m's 27 x 27 at 384 px); None: a vision
                dict's `downsample`, else 2.
            weights: False builds the structure only (see `_structure_only`).

        Raises:
            ValueError: an unknown strategy, an unsupported LLM or vision architecture, a token grid
                the downsampler cannot divide, or a device / dtype that is not available.
            FileNotFoundError: a missing folder or file, or a base folder without config.json.
        """
        if isinstance(strategy, str):
            strategy = Strategy(strategy, **strategy_options)
        where, dtype = resolve_placement(device, dtype)
        encoder, options = split_tower_options(DEFAULT_VISION if vision is None else vision)
        if downsample is not None:
            options["downsample"] = downsample
        with _structure_only(not weights):
            base, spec, fp = _load_base(llm, dtype, where, weights)
            tower = VisionTower(load_vision(encoder, dtype, weights), base.config.hidden_size, **options)
            if weights:  # (a structure's buffers stay where they are: its parameters are on the meta device)
                tower = tower.to(base.device)
            model = cls(base, tower, strategy, spec, fp, shared_base)
        if not weights:
            model.tie_weights()
        elif not isinstance(llm, PreTrainedModel):  # its files' hash, done beside the loads above, is awaited
            _ = model.base_fingerprint  # (a model object's tensors are hashed only if it is saved)
        return model

    def _install_delta(self, empty: bool) -> None:
        s, router, n = self.strategy, self.router, len(self.llm.model.layers)
        blocks = [f"model.layers.{i}" for i in s.block_indices(n)]
        if s.family == "cogvlm":
            inside = [*(f"self_attn.{t}" for t in EXPERT_TARGETS[:-1]), EXPERT_TARGETS[-1]]  # q, k, v; the MLP
            experts = {f"{b}.{t}" for b in blocks for t in inside}
            swap_modules(self.llm, lambda _, m: Expert(m, router, empty), lambda name, _: name in experts)
        else:  # `full`: every block copied, the final norm too (embeddings stay: no resize)
            copied = {*blocks, "model.norm"} if s.family == "full" else set(blocks)
            swap_modules(self.llm, lambda _, m: Switch(m, router, empty), lambda name, _: name in copied)
        lora_blocks = tuple(f"model.layers.{i}." for i in s.lora_indices(n))
        swap_modules(
            self.llm,
            lambda _, m: LoRALinear(m, router, s.lora_rank, s.lora_alpha, empty),
            lambda name, m: (
                isinstance(m, nn.Linear) and name.startswith(lora_blocks) and name.rsplit(".", 1)[-1] in s.lora_targets
            ),
        )
        group_siblings(self.llm)

    # the delta ------------------------------------------------------------------------------
    def _delta_prefixes(self) -> list[str]:
        """State-dict prefixes of the delta: the vision tower, and what the routing wrappers name."""
        members = delta_members(self)
        return [VISION_PREFIX, *(f"{name}." if isinstance(child, nn.Module) else name for name, _, child in members)]

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not the base LLM: copies, experts, LoRA, projector and ViT. On a model
        sharded with FSDP2 each tensor is gathered whole, so every rank must call this together."""
        return {k: _gathered(v) for k, v in self._delta_items()}

    def _delta_items(self):
        """(key, tensor) of the delta as the model holds it (shards, on a model sharded with FSDP2)."""
        prefixes = tuple(self._delta_prefixes())
        return ((k, v) for k, v in self.state_dict().items() if k.startswith(prefixes))

    def check_continues(self, directory: str | Path) -> None:
        """Refuse a saved model folder that this freshly built model cannot continue training from:
        one trained on another base (by fingerprint), or whose delta holds other tensors or shapes
        (another strategy, LoRA rank or tower). Reads the manifest and the delta's header only; call it
        before the model is sharded.

        Raises:
            ValueError: naming the difference."""
        saved_fp = read_manifest(directory)["base"]["fingerprint"]
        directory = Path(directory)
        if not _same_base(saved_fp, self.base_fingerprint, self.base_spec, self.llm):
            raise ValueError(
                f"{directory} was trained on another base LLM than {self.base_spec!r} (fingerprint "
                f"{_short(saved_fp)} != {_short(self.base_fingerprint)})"
            )
        with safe_open(directory / DELTA, "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        mismatch = _delta_mismatch(saved, {k: tuple(v.shape) for k, v in self._delta_items()})
        if mismatch:
            raise ValueError(f"{directory / DELTA} does not fit this model: {mismatch}")

    def llm_delta_parameters(self) -> list[nn.Parameter]:
        prefixes = tuple(p for p in self._delta_prefixes() if p != VISION_PREFIX)
        return [p for name, p in self.named_parameters() if name.startswith(prefixes)]

    @property
    def deploys_base_for_text(self) -> bool:
        """The text path this checkpoint is deployed with: the untouched base for GenieBlue (unless
        `shared_base`); the baselines (full, LoRA, CogVLM) send text through their fine-tuned weights."""
        return self.strategy.family == "genieblue" and not self.shared_base

    def set_stage(self, stage: int) -> None:
        """Stage 1: connector (token mixer, projector) only. Stage 2: ViT, connector, copies / experts and LoRA.
        Original LLM weights are never trainable."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.requires_grad_(False)
        for p in self.vision.connector_parameters():
            p.requires_grad_(True)
        if stage == 2:
            self.vision.vit.requires_grad_(True)
            for p in self.llm_delta_parameters():
                p.requires_grad_(True)

    @property
    def base_fingerprint(self) -> str:
        if callable(self._base_fingerprint):
            self._base_fingerprint = self._base_fingerprint()
        return self._base_fingerprint

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def tie_weights(self) -> None:
        """Tie the base's output embeddings to its input ones again, where its config ties them: moving a
        model to the meta device unties them (accelerate's FSDP2 preparation calls this after it)."""
        self.llm.tie_weights()

    def _on_device(self, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """Inputs moved to the model's device (a no-op where they already are); dtypes kept."""
        return tuple(t if t is None else t.to(self.device) for t in tensors)

    # forward --------------------------------------------------------------------------------
    def embed_multimodal(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        """Token embeddings with image features spliced in; returns (embeds, visual-token mask).
        In training, a batch without images still runs the vision tower on one blank tile and adds
        0 x its output, so every trainable parameter gets a gradient (zero for ViT and projector):
        data-parallel ranks that see different modalities then reduce the same parameters (what
        FSDP and ZeRO-3 need, or they hang)."""
        visual = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(visual, 0))
        placeholders = int(visual.sum())
        if pixel_values is None:
            _refuse_placeholders(placeholders)
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters()):
                size, param = self.vision.image_size, next(self.vision.parameters())
                blank = torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)
                embeds = embeds + 0 * self.vision(blank).sum().to(embeds.dtype)
            return embeds, visual
        feats = self.vision(pixel_values)
        tiles, per_tile, width = feats.shape
        if placeholders != tiles * per_tile:
            raise ValueError(
                f"input_ids hold {placeholders} image placeholder tokens but pixel_values give "
                f"{tiles * per_tile} image tokens ({tiles} tiles x {per_tile} tokens)"
            )
        embeds = embeds.masked_scatter(visual.unsqueeze(-1), feats.reshape(-1, width).to(embeds.dtype))
        return embeds, visual

    def _text_only(self, input_ids, pixel_values, shared_base) -> bool:
        shared = self.shared_base if shared_base is None else shared_base
        if pixel_values is None and not shared:
            _refuse_placeholders(int((input_ids == IMAGE_TOKEN_INDEX).sum()))
            return True
        return False

    def forward(
        self, input_ids, attention_mask=None, pixel_values=None, labels=None, shared_base=None, head=None, **kwargs
    ):
        """Logits (and loss with `labels`). Text-only inputs take the untouched base path unless
        `shared_base` (default: the model's setting) sends them through the multimodal path. Inputs
        on another device are moved to the model's. `head` (training, without `labels`): a function of
        the decoder's final hidden states (B, T, H) and `self.logits`, whose value is returned instead
        of the LM's output, so that a loss can take the logits a few positions at a time (`train.loss`)
        inside the forward that DDP / FSDP wrap."""
        if head is not None and labels is not None:
            raise ValueError("pass either labels (the LM's own loss) or head, not both")
        input_ids, attention_mask, pixel_values, labels = self._on_device(
            input_ids, attention_mask, pixel_values, labels
        )
        if self._text_only(input_ids, pixel_values, shared_base):
            with self.router.route(image=False):
                return self._decode(head, input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        embeds, visual = self.embed_multimodal(input_ids, pixel_values)
        with self.router.route(image=True, visual_mask=visual):
            return self._decode(head, inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def _decode(self, head, labels=None, **inputs):
        if head is None:
            return self.llm(labels=labels, **inputs)
        return head(self.llm.model(**inputs).last_hidden_state, self.logits)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM's logits for final hidden states: its (frozen) LM head, then the soft cap of an LM
        that caps its logits (Gemma's `final_logit_softcapping`), as its own forward does."""
        logits = self.llm.get_output_embeddings()(hidden)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, shared_base=None, **gen_kwargs):
        """transformers `generate` on the routed model; returns only the new tokens (B, new)."""
        input_ids, attention_mask, pixel_values = self._on_device(input_ids, attention_mask, pixel_values)
        config = self.llm.generation_config
        if config.pad_token_id is None and config.eos_token_id is not None:  # as transformers would, unwarned
            eos = config.eos_token_id
            gen_kwargs.setdefault("pad_token_id", eos if isinstance(eos, int) else eos[0])
        if self._text_only(input_ids, pixel_values, shared_base):
            with self.router.route(image=False):
                out = self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
            return out[:, input_ids.shape[1] :]
        embeds, visual = self.embed_multimodal(input_ids, pixel_values)
        with self.router.route(image=True, visual_mask=visual):
            return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **gen_kwargs)

    def gradient_checkpointing_enable(self) -> None:
        """Checkpoint decoder blocks; each recompute replays the routing mode of its forward."""
        self.llm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": self.router.checkpoint_context_fn}
        )

    def compile_blocks(self, **options) -> None:
        """`torch.compile` the attention and MLP of every decoder block for the image path (a training
        option; `options` go to torch.compile); text mode still runs them eagerly, op for op the base.
        The blocks themselves stay eager, so gradient checkpointing (which recomputes a block with a
        `context_fn` torch.compile cannot trace) wraps compiled parts."""
        for block in self.llm.model.layers:
            block = block.copy if isinstance(block, Switch) else block
            for part in (block.self_attn, block.mlp):
                part.forward = functools.partial(self._by_mode, torch.compile(part.forward, **options), part.forward)

    def _by_mode(self, image_path, text_path, *args, **kwargs):
        return (image_path if self.router.image else text_path)(*args, **kwargs)

    def cast_base_projections(self, dtype: torch.dtype) -> int:
        """Hold the base's projections (the weight and bias of every `nn.Linear` of the LLM that is
        neither in the delta nor tied to the input embeddings) in `dtype`, the compute dtype of a
        mixed-precision training run; returns the number of values cast. Autocast casts a float32
        projection to that dtype at each use, so a step under it computes exactly what it computed
        before, without the float32 copy (2 of 4 bytes a weight), the cast copy each use keeps for the
        backward (2 more), or the casts. Embeddings and norms, which autocast leaves in float32, stay.
        Outside such autocast these projections refuse float32 inputs: a training option."""
        if self.llm.device.type != "meta":  # (a structure's base is named by its files, when asked)
            _ = self.base_fingerprint  # a base without files is named by its tensors as loaded: name it first
        delta = {id(p) for p in self.llm_delta_parameters()}
        tied = self.llm.get_input_embeddings().weight
        cast = 0
        for module in self.llm.modules():
            params = list(module.parameters(recurse=False))
            if not isinstance(module, nn.Linear) or any(id(p) in delta or p is tied for p in params):
                continue
            module.to(dtype)
            cast += sum(p.numel() for p in params)
        return cast

    # persistence ----------------------------------------------------------------------------
    def manifest(self) -> dict:
        n = len(self.llm.model.layers)
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "base": {
                "llm": self.base_spec,
                "model_type": self.llm.config.model_type,
                "num_layers": n,
                "fingerprint": self.base_fingerprint,
            },
            "strategy": self.strategy.to_dict(),
            "block_indices": self.strategy.block_indices(n),
            "lora_indices": self.strategy.lora_indices(n),
            "vision": {"config": self.vision.vit.config.to_dict(), **self.vision.settings()},
            "image_token_index": IMAGE_TOKEN_INDEX,
            "tokens_per_tile": self.vision.tokens_per_tile,
            "image_size": self.vision.image_size,
            "shared_base": self.shared_base,
        }

    def save_pretrained(self, directory: str | Path, training: dict | None = None) -> Path:
        """Write the delta (safetensors), a manifest naming the base and its fingerprint, and a model
        card (README.md, see `card`); the folder appears atomically and the base is never written.

        Args:
            directory: the folder to write (replaced whole if it exists).
            training: what the model was trained on (from the trainer), written to training.json and
                into the card.

        In a distributed run every rank may call it: a model sharded with FSDP2 is gathered by all
        ranks together (so there every rank must call it), and only rank 0 writes.
        """
        directory = Path(directory)
        writer, state = writes_files(), {}
        for key, tensor in self._delta_items():  # one tensor at a time: the GPU never holds a gathered delta
            tensor = _gathered(tensor)
            if writer:
                state[key] = tensor.detach().cpu().contiguous()
        if not writer:
            return directory
        with atomic_dir(directory) as tmp:
            save_file(state, tmp / DELTA, metadata={"format": "pt"})
            write_json(
                tmp / MANIFEST, {**self.manifest(), "params": parameter_report(self, count_bytes=False)["params"]}
            )
            if training is not None:
                write_json(tmp / TRAINING, training)
            write_card(tmp, name=str(directory))
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        llm: str | PreTrainedModel | None = None,
        dtype: torch.dtype | str | None = None,
        strategy: Strategy | str | None = None,
        device: torch.device | str | None = None,
        weights: bool = True,
    ) -> GenieBlueForConditionalGeneration:
        """Load a saved delta onto its base, in eval mode (as transformers loads a model).

        Args:
            directory: a folder written by `save_pretrained` (or `genieblue train`).
            llm: the base, when not the one the manifest names (a hub id, folder, .gguf file or a
                loaded model, used as it is, on its own device and in its own dtype); it must hold the
                same weights.
            dtype, device: where to run (default: cuda when present, else cpu; bfloat16 on a GPU,
                float32 on a CPU); a torch dtype or a name such as "bfloat16". The base check does
                not depend on them: the fingerprint names the base's files, not how they were loaded.
            strategy: another strategy than the saved one (a `Strategy` or a name): only the vision
                tower and connector are taken from the folder, the LLM delta starts fresh (one stage 1
                for several stage 2s).
            weights: False builds the structure only (see `_structure_only`): neither the base's
                weights nor the delta are read, and the base is not checked.

        Raises:
            FileNotFoundError: the folder lacks its manifest or delta, or the base cannot be found.
            ValueError: the base is not the one the delta was trained on (or, a model object with no
                files behind it, not passed again), the delta does not match the strategy, or a device /
                dtype that is not available.
        """
        manifest = read_manifest(directory)
        directory = Path(directory)
        where, dtype = resolve_placement(device, dtype)
        saved_fp = manifest["base"]["fingerprint"]
        vision = dict(manifest["vision"])
        saved = Strategy(**manifest["strategy"])
        strategy = Strategy(strategy) if isinstance(strategy, str) else strategy
        fresh = strategy is not None and strategy != saved  # its LLM delta starts fresh: built with data
        if llm is None and manifest["base"]["llm"] == "":  # (None names the built-in default)
            raise ValueError(
                f"{directory} was trained on a base given as a model object with no files behind it: "
                "pass an equal one with llm=..."
            )
        with _structure_only(not weights):
            base, spec, fp = _load_base(manifest["base"]["llm"] if llm is None else llm, dtype, where, weights)
            with no_init_weights(), torch.device(where):  # built where it runs, uninitialised: its weights load below
                tower = VisionTower(load_vision(vision.pop("config"), dtype), base.config.hidden_size, **vision)
            model = cls(base, tower, strategy or saved, spec, fp, manifest.get("shared_base", False), not fresh)
        if not weights:
            model.tie_weights()
            return model.eval()
        try:
            state = load_file(directory / DELTA)  # views of the file, mapped: read where `_placed` needs them
        except SafetensorError as err:
            raise ValueError(f"{directory / DELTA} is damaged ({err}): save the model again") from None
        targets = dict(model._delta_items())
        if fresh:  # the tower from the folder, the LLM delta as built
            state = {k: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
            targets = {k: v for k, v in targets.items() if k.startswith(VISION_PREFIX)}
        mismatch = _delta_mismatch({k: v.shape for k, v in state.items()}, {k: v.shape for k, v in targets.items()})
        if not mismatch:  # while a first load's base files are still being hashed
            model.load_state_dict(_placed(state, targets, where), strict=False, assign=True)
            tower.settle_layout()
        if not _same_base(saved_fp, model.base_fingerprint, spec, base):  # the first error a wrong base gives
            raise ValueError(
                f"base LLM {spec!r} is not the one this delta was trained on (fingerprint "
                f"{_short(model.base_fingerprint)} != {_short(saved_fp)}): pass the original base with llm=..."
            )
        if mismatch:
            raise ValueError(f"{directory / DELTA} does not match the strategy: {mismatch}")
        return model.eval()


def _placed(state: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], device: torch.device) -> dict:
    """A delta file's tensors (`load_file`'s views of the file's mapping) on `device`, each in its
    target's dtype, to take the places of the model's empty `targets`, one tensor at a time (a GPU
    holds one float32 tensor at a time, not the whole delta twice). On the CPU they stay views of the
    file unless any is cast; then every one is copied out of it, so that the mapping is released (a
    single view left in it keeps the whole file resident). To a GPU each goes as saved and is cast
    there (a blocking copy to the GPU in another dtype would cast on the host)."""
    if device.type != "cpu":
        return {k: v.to(device).to(targets[k].dtype) for k, v in state.items()}
    cast = any(v.dtype != targets[k].dtype for k, v in state.items())
    return {k: v.to(targets[k].dtype, copy=cast) for k, v in state.items()}


def _delta_mismatch(saved: dict[str, tuple], held: dict[str, tuple]) -> str | None:
    """How a saved delta's tensors (name -> shape) differ from those a model holds, in words; None
    when they are the same."""
    missing, extra = sorted(held.keys() - saved.keys()), sorted(saved.keys() - held.keys())
    resized = [
        f"{k} {tuple(saved[k])} != {tuple(held[k])}" for k in sorted(saved.keys() & held.keys()) if saved[k] != held[k]
    ]
    parts = [
        f"{what} {len(names)} (e.g. {', '.join(names[:2])})"
        for what, names in (("missing", missing), ("unexpected", extra), ("other shapes", resized))
        if names
    ]
    return "; ".join(parts) or None


def _short(fp: str) -> str:
    return fp.removeprefix(FILES_SCHEME)[:12]


def _same_base(saved: str, fp: str, spec, base: PreTrainedModel) -> bool:
    """Whether the loaded base (fingerprint `fp`) is the one a delta was saved on (`saved`). A delta of
    an earlier version names its base's tensors in float32 (how those versions loaded it): they are
    hashed once from a float32 copy, and the match is remembered with the files' fingerprint."""
    if saved == fp or saved.startswith(FILES_SCHEME) or not fp.startswith(FILES_SCHEME):
        return saved == fp
    if remembered_match(fp, saved):
        return True
    reference = base if base.dtype == torch.float32 and base.device.type == "cpu" else load_llm(spec)
    if tensors_fingerprint(reference) != saved:
        return False
    remember_match(fp, saved)
    return True
