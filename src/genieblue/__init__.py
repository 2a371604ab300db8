"""genieblue: give a frozen LLM eyes without costing it a point of language ability (GenieBlue).

Rooms: `model` (construction), `data`, `train`, `infer` (engine and server), `eval`, `deploy`,
and `cli`, with arrows pointing one way: cli -> train/infer/eval/deploy -> data/model -> transformers.
"""

from .model import GenieBlueForConditionalGeneration, Strategy

__version__ = "0.1.0"
__all__ = ["GenieBlueForConditionalGeneration", "Strategy", "__version__"]
