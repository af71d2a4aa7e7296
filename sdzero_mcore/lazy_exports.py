"""Package names that load their module on first use (PEP 562 ``__getattr__``): importing
megatron-core costs seconds, and callers such as `sdzero --help` or a spawned worker that has yet
to apply its warning filters must not pay for, or trigger, it."""

import importlib
from typing import Callable, Mapping


def lazy_getattr(package: str, homes: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``homes`` maps each exported name to the submodule
    (relative to ``package``) that defines it; other names raise AttributeError, as a module must,
    so ``from package import submodule`` still imports the submodule."""

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)

    return __getattr__
