"""genieblue: give a frozen LLM eyes without costing it a point of language ability (GenieBlue).

Rooms: `model` (construction), `data`, `train`, `infer` (engine and server), `eval`, `deploy`,
the `demo` and `cli`, with arrows pointing one way: a room imports only rooms after it in cli, demo,
train, infer, deploy, eval, loading, data, model (infer serves exports through deploy's runtime, deploy
measures with eval's text measures); `loading` (a saved model with its tokenizer and processor) sits
between the rooms that use a saved model and data/model.
The top-level names are imported lazily, so the CLI starts without loading torch.
"""

__version__ = "0.1.0"
__all__ = ["GenieBlueForConditionalGeneration", "Strategy", "__version__"]


def __getattr__(name):
    if name in ("GenieBlueForConditionalGeneration", "Strategy"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'genieblue' has no attribute {name!r}")
