"""Training: configs, the paper's optimiser and schedule, atomic checkpoints and the stage-1/2 loop."""

from .config import DataSource, TrainConfig
from .trainer import BadDataError, Trainer

__all__ = ["BadDataError", "DataSource", "TrainConfig", "Trainer"]
