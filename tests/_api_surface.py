"""Compare this package's public API with a recorded API surface (see ``scripts/dump_api_surface.py``).

Used by ``test_api_surface.py`` against the record of micro_sam 1.8.14 in ``tests/data``. Each problem
is a ``(key, message)`` pair; the key (``"module:name"``, ``"module:name(param)"``, ``"module:Class.method"``)
is what the test's allow-list names.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from typing import Dict, Iterator, List, Optional, Tuple

Problem = Tuple[str, str]

_VARIADIC = ("VAR_POSITIONAL", "VAR_KEYWORD")


def is_stdlib_name(entry: dict) -> bool:
    """Whether a recorded function/class is defined in the Python standard library."""
    top = (entry.get("module") or "").split(".")[0]
    return top in sys.stdlib_module_names


def is_own_name(entry: dict) -> bool:
    """Whether a recorded function/class is defined in micro_sam (rather than re-exported from elsewhere)."""
    return (entry.get("module") or "").startswith("micro_sam")


def _describe_default(value) -> dict:
    simple = (type(None), bool, int, float, str)

    def literal(v):
        return isinstance(v, simple) or (isinstance(v, (tuple, list)) and all(literal(x) for x in v))

    return {"repr": repr(value)} if literal(value) else {"type": type(value).__name__}


def compare_parameters(key: str, reference: Optional[List[dict]], obj) -> Iterator[Problem]:
    """Problems of ``obj``'s signature against the recorded reference parameters.

    Rules: the reference's positional parameters keep their names and positions (ours may add parameters after
    them); its keyword-only parameters exist (positional or keyword-only); ``*args`` / ``**kwargs`` stay; a
    parameter with a default keeps a default, and literal defaults (None, numbers, strings, tuples) are equal.
    """
    if reference is None:
        return
    try:
        ours = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        yield key, "has no inspectable signature"
        return
    by_name = {p.name: p for p in ours}
    ours_positional = [p.name for p in ours if p.kind.name in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    ref_positional = [p["name"] for p in reference if p["kind"] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    if ours_positional[:len(ref_positional)] != ref_positional:
        yield key, f"positional parameters {ours_positional} do not start with the reference's {ref_positional}"
    for kind in _VARIADIC:
        if any(p["kind"] == kind for p in reference) and not any(p.kind.name == kind for p in ours):
            yield key, f"lost the reference's {'*args' if kind == 'VAR_POSITIONAL' else '**kwargs'}"
    for param in reference:
        if param["kind"] in _VARIADIC:
            continue
        name = param["name"]
        own = by_name.get(name)
        if own is None:
            if param["kind"] == "KEYWORD_ONLY":
                yield f"{key}({name})", f"keyword-only parameter {name!r} is missing"
            continue  # a missing positional parameter is reported by the order check above
        if "default" not in param:
            continue
        if own.default is inspect.Parameter.empty:
            yield f"{key}({name})", f"parameter {name!r} lost its default {param['default']}"
            continue
        ours_default = _describe_default(own.default)
        if "repr" in param["default"] and ours_default != param["default"]:
            yield f"{key}({name})", f"default of {name!r} is {ours_default} instead of {param['default']}"


def compare_entry(module_name: str, name: str, entry: dict, module) -> Iterator[Problem]:
    """Problems of one recorded name of a module (it is known to be in scope)."""
    key = f"{module_name}:{name}"
    if not hasattr(module, name):
        yield key, f"{entry['kind']} {name!r} is missing"
        return
    obj = getattr(module, name)
    if entry["kind"] == "constant":
        if "value" in entry and repr(obj) != entry["value"]:
            yield key, f"value {obj!r} instead of {entry['value']}"
        if "keys" in entry:
            keys = set(map(str, obj)) if isinstance(obj, dict) else set()
            missing = sorted(set(entry["keys"]) - keys)
            if missing:
                yield key, f"keys {missing} are missing"
        return
    if entry["kind"] == "class" and not inspect.isclass(obj):
        yield key, f"is a {type(obj).__name__}, the reference has a class"
        return
    if not callable(obj):
        yield key, f"is not callable, the reference has a {entry['kind']}"
        return
    if not is_own_name(entry):
        return  # re-exports of other packages: only their presence is part of micro_sam's surface
    yield from compare_parameters(key, entry.get("params"), obj)
    for method, params in (entry.get("methods") or {}).items():
        method_key = f"{key}.{method}"
        own = inspect.getattr_static(obj, method, None)
        if own is None:
            yield method_key, f"method {method!r} is missing"
        elif params == "property":
            continue
        else:
            yield from compare_parameters(method_key, params, getattr(obj, method))


def compare_module(module_name: str, entries: Dict[str, dict], skip=lambda key: False) -> List[Problem]:
    """All problems of one module against its recorded entries (stdlib re-exports are not part of the API)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        return [(module_name, f"cannot be imported: {error}")]
    problems = []
    for name, entry in sorted(entries.items()):
        if entry["kind"] != "constant" and is_stdlib_name(entry):
            continue
        if skip(f"{module_name}:{name}"):
            continue
        problems.extend(compare_entry(module_name, name, entry, module))
    return problems
