"""Parameter accounting per strategy (the paper's #Param column) and the bytes of the delta's tensors.

`modeling` writes these counts into every saved manifest, so this module reads a model only through
its attributes and never imports `modeling` (the arrow points one way)."""

from __future__ import annotations

from torch import nn

from .routing import delta_members


def parameter_report(model: nn.Module, count_bytes: bool = True) -> dict:
    """Counts of base and delta parameters of a model.

    Args:
        model: a `GenieBlueForConditionalGeneration` (its `llm`, `vision`, `strategy` and `base_spec`
            are read).
        count_bytes: add `delta_bytes`, the bytes of the delta's tensors as `save_pretrained` writes
            them (the file adds only its header); a structure built without weights is measured too.
            It reads `delta_state_dict()`, which on a sharded model every rank must call together.

    Returns:
        strategy, base, block and LoRA indices, `params` (base LLM, copies, experts, LoRA, ViT,
        projector (with the token mixer, if the tower has one: the connector), trainable), trainable
        and LLM-delta shares of the base, tokens per tile.
    """
    groups = {"copies": 0, "experts": 0, "lora": 0}
    for _, part, child in delta_members(model.llm):
        groups[part] += sum(p.numel() for p in child.parameters()) if isinstance(child, nn.Module) else child.numel()
    llm_total = sum(p.numel() for p in model.llm.parameters())
    base = llm_total - sum(groups.values())
    vit = sum(p.numel() for p in model.vision.vit.parameters())
    projector = sum(p.numel() for p in model.vision.connector_parameters())
    trainable = sum(groups.values()) + vit + projector
    n = len(model.llm.model.layers)
    report = {
        "strategy": model.strategy.name,
        "base_llm": model.base_spec,
        "llm_type": model.llm.config.model_type,
        "num_layers": n,
        "block_indices": model.strategy.block_indices(n),
        "lora_indices": model.strategy.lora_indices(n),
        "params": {"base_llm": base, **groups, "vit": vit, "projector": projector, "trainable": trainable},
        "trainable_vs_base_llm": trainable / base,
        "llm_delta_vs_base_llm": sum(groups.values()) / base,
        "tokens_per_tile": model.vision.tokens_per_tile,
    }
    if count_bytes:
        report["delta_bytes"] = sum(t.numel() * t.element_size() for t in model.delta_state_dict().values())
    return report
