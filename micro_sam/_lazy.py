"""Module attributes that are imported on first use, to keep module imports cheap (PEP 562)."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Tuple


def lazy_attributes(namespace: dict, targets: Dict[str, str]) -> Tuple[Callable, Callable]:
    """Build a module's ``__getattr__`` and ``__dir__`` for names that are imported on first access.

    Args:
        namespace: The module's ``globals()``; a resolved name is stored there, so it is looked up only once.
        targets: Attribute name -> ``"package.module:attribute"`` it stands for.

    Returns:
        ``(__getattr__, __dir__)`` to assign at module level.
    """
    module_name = namespace["__name__"]

    def __getattr__(name: str):
        target = targets.get(name)
        if target is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        source, _, attribute = target.partition(":")
        value = getattr(importlib.import_module(source), attribute)
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(targets))

    return __getattr__, __dir__
