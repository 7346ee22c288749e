"""Public names that load on first use, for a package's __init__: `import fashionlab` and the command
line's start-up stay light, and `fashionlab serve --workers N`'s supervisor never loads torch."""

from __future__ import annotations

import importlib
from typing import Callable


def exports(package: str, public: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """The package's module-level __getattr__ and __dir__ (PEP 562) for `public`: name -> the submodule
    that defines it. A name, once loaded, is stored in the package's namespace: later look-ups skip this."""

    def __getattr__(name: str):
        if name in public:
            value = getattr(importlib.import_module(f"{package}.{public[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__
