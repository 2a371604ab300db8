"""genieblue's run-time requirements (pyproject.toml's `dependencies`) and everything they need in turn,
as this interpreter has them: the check `bench/gpu.sh` runs before its first stage, and the list of
wheels `bench/gpu_offline.sh` brings to a GPU machine without a package index.

    python3 bench/requirements.py check    # one line naming each package missing or at a version not allowed; exit 1
    python3 bench/requirements.py wheels   # name==version of what a PyTorch CUDA image may lack

`wheels` leaves out torch and what torch needs (the image's own) and `IMAGE`, packages every such image
holds whose wheels are large; `check` still checks those where they run.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMAGE = {"torch", "numpy", "pillow", "matplotlib"}
"""Left out of `wheels`, with what only they need (numpy, pillow and matplotlib: 30 MB of the ~55)."""


def _requirements() -> list[Requirement]:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    return [Requirement(spec) for spec in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def walk(roots: list[Requirement], stop: set[str] = frozenset()) -> tuple[dict[str, str], list[str]]:
    """({name: installed version} of `roots` and what they need in turn, [what is wrong, a line each]);
    a package in `stop` is listed but what it needs is not walked."""
    found, wrong, todo = {}, [], list(roots)
    while todo:
        need = todo.pop()
        name = canonicalize_name(need.name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            wrong.append(f"{name} missing (needed: {need})")
            continue
        if not need.specifier.contains(dist.version, prereleases=True):
            wrong.append(f"{name} {dist.version} (needed: {need})")
        if name in found:
            continue
        found[name] = dist.version
        if name in stop:
            continue
        for spec in dist.requires or []:
            sub = Requirement(spec)
            extras = need.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(sub)
    return found, sorted(set(wrong))


def main() -> None:
    roots = _requirements()
    if sys.argv[1:] == ["check"]:
        _, wrong = walk(roots)
        if wrong:
            sys.exit(
                "error: " + "; ".join(wrong) + ". Without a package index, make the wheels with "
                "bench/gpu_offline.sh DIR and run WHEELS=DIR/wheels TOKENIZER=DIR/tokenizer bench/gpu.sh"
            )
    elif sys.argv[1:] == ["wheels"]:
        found, _ = walk(roots, stop=IMAGE)
        torch, _ = walk([Requirement("torch")])
        print("\n".join(f"{name}=={v}" for name, v in sorted(found.items()) if name not in IMAGE and name not in torch))
    else:
        sys.exit("usage: python3 bench/requirements.py check|wheels")


if __name__ == "__main__":
    main()
