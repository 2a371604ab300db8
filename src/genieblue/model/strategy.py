"""Training strategies of the paper: which decoder blocks get a trainable copy or a visual expert,
and where LoRA goes.

Block choice for `n` decoder blocks and `fraction` f (default 1/4), with step = round(1/f) and
k = max(1, n // step) chosen blocks:
  * skip: blocks step-1, 2*step-1, ... (every 4th block, e.g. 3, 7, 11, ... for f = 1/4; the last
          block when there are fewer than a step)
  * pre:  blocks 0 .. k-1 (the first quarter)
  * post: blocks n-k .. n-1 (the last quarter)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

STRATEGIES = (
    "genieblue-skip",
    "genieblue-pre",
    "genieblue-post",
    "cogvlm-skip",
    "cogvlm-pre",
    "cogvlm-post",
    "lora",
    "full",
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_TARGETS = ("q_proj", "k_proj", "v_proj", "mlp")


def _number(value, kind: type = float) -> bool:
    """Whether `value` is a number of `kind` (float: an int or a float), not a bool or a string."""
    return not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind)


@dataclass(frozen=True)
class Strategy:
    """How the frozen LLM is extended. `name` is one of STRATEGIES."""

    name: str = "genieblue-skip"
    fraction: float = 0.25
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = field(default=LORA_TARGETS)

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r}; choose one of: {', '.join(STRATEGIES)}")
        if not _number(self.fraction) or not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be a number in (0, 1], got {self.fraction!r}")
        if not _number(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a whole number >= 1, got {self.lora_rank!r}")
        if not _number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown lora_targets {unknown}; choose from: {', '.join(LORA_TARGETS)}")
        object.__setattr__(self, "lora_targets", targets)

    @property
    def family(self) -> str:
        """'genieblue' (copied blocks), 'cogvlm' (visual experts), 'lora' or 'full'."""
        return self.name.split("-")[0]

    @property
    def placement(self) -> str | None:
        return self.name.split("-")[1] if "-" in self.name else None

    def block_indices(self, num_layers: int) -> list[int]:
        """Blocks that get a copy (genieblue), an expert (cogvlm), or all of them (full)."""
        if self.family == "full":
            return list(range(num_layers))
        if self.family == "lora":
            return []
        step = max(1, round(1 / self.fraction))
        k = max(1, num_layers // step)
        if self.placement == "skip":  # (with fewer blocks than a step, the last one)
            return list(range(min(step, num_layers) - 1, num_layers, step))[:k]
        if self.placement == "pre":
            return list(range(k))
        return list(range(num_layers - k, num_layers))

    def lora_indices(self, num_layers: int) -> list[int]:
        """Blocks that get LoRA: every block that is not copied / given an expert (none for full)."""
        if self.family == "full":
            return []
        chosen = set(self.block_indices(num_layers))
        return [i for i in range(num_layers) if i not in chosen]

    def settings(self) -> dict:
        """What shapes this strategy's LLM delta: its name, the fraction where some blocks are copied or
        given experts, and LoRA's rank and alpha where there is LoRA (not `full`)."""
        shape = {"name": self.name}
        if self.family in ("genieblue", "cogvlm"):
            shape["fraction"] = self.fraction
        if self.family != "full":
            shape.update(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)
        return shape

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d
