"""Training: configs, the paper's optimiser and schedule, the chunked loss, atomic checkpoints, the
layouts (one process, DDP, FSDP2: `distributed`), stage 0 (`vision_pretrain`) and the stage-1/2 loop."""

from .config import DataSource, TrainConfig
from .trainer import BadDataError, Trainer

__all__ = ["BadDataError", "DataSource", "TrainConfig", "Trainer"]
