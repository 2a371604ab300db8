"""Lazy re-exports for a package's `__init__`: each name imports its module on first use, so light
entry points (the CLI, onnxruntime worker processes) do not load torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], object], list[str]]:
    """(`__getattr__`, `__all__`) for `package` re-exporting `exports` (module -> names)."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name in module_of:
            return getattr(importlib.import_module(f".{module_of[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(module_of)
