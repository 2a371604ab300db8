"""The settings of `genieblue demo` and their defaults, in a module light enough for the CLI to read
them into its --help (the demo itself lives in `demo`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DemoConfig:
    out: str = "demo_out"
    llm: str | None = None
    compare: list[str] = field(default_factory=list)
    n_train: int = 1200
    n_test: int = 480
    seeds: int = 1  # training seeds per strategy (seed, seed+1, ...); the data stay those of `seed`
    text_fraction: float = 0.1  # text-only samples mixed into stage 2
    # text-only caption-reading exercises in stage 2 (see data.synthetic.reading_exercises), tasks in turn
    exercises: int = 200
    exercise_tasks: list[str] = field(default_factory=lambda: ["position"])
    stage0_steps: int = 900  # the vision tower learns to spell captions of fresh images (see train.vision_pretrain)
    # how many of every 13 stage-0 images each task draws: the tasks a tower finds hard more often
    stage0_weights: dict[str, int] = field(
        default_factory=lambda: {"colour": 1, "shape": 1, "count": 2, "position": 4, "read": 3, "chart": 2}
    )
    stage1_steps: int = 15
    stage2_epochs: float = 1.0
    max_length: int = 640  # ~12 samples per packed row: one optimizer step
    lr: float = 6e-4  # copies / experts / LoRA
    # every weight under full fine-tuning: at `lr` it falls behind on the image tasks and its text (docs/method.md)
    full_lr: float = 2e-4
    vision_lr: float = 1e-3  # token mixer and projector in stage 1
    stage2_vision_lr: float = 3e-4  # the whole tower in stage 2, gently: stage 0 already taught it to spell
    image_size: int = 64
    seed: int = 0
    device: str | None = None  # training and evaluation (None: cuda when present, see model.placement)
    dtype: str | None = None  # evaluation (None: bfloat16 on a GPU, float32 on a CPU); training: precision auto
