"""Record the public API surface of an installed micro_sam as JSON.

Run it with the python of the reference environment (the published micro_sam 1.8.14) to regenerate the data
file that ``tests/test_api_surface.py`` compares this package against::

    /tmp/micro-sam-reference/bin/python scripts/dump_api_surface.py tests/data/micro_sam_1.8.14_api.json

Run it from the repository root (not from inside a ``micro_sam`` folder, which would shadow packages).
For each public module (no ``_``-prefixed part) it records:

- functions and classes: their module of definition, and the parameters of the function / the class
  constructor (name, kind, default); for classes defined in micro_sam also their public methods;
- constants (upper-case names and micro_sam's own type aliases): their type and, where it is plain data,
  their value (dicts: their keys).

Defaults and values are stored as ``{"repr": ...}`` when they are plain literals (None, bool, numbers,
strings and tuples/lists of those), otherwise as ``{"type": <type name>}``.
"""
import importlib
import inspect
import json
import pkgutil
import sys
import typing
import warnings

_SIMPLE = (type(None), bool, int, float, str)


def _is_literal(value) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_literal(v) for v in value)
    return False


def _describe_value(value) -> dict:
    if _is_literal(value):
        return {"repr": repr(value)}
    return {"type": type(value).__name__}


def _parameters(obj):
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = []
    for p in signature.parameters.values():
        entry = {"name": p.name, "kind": p.kind.name}
        if p.default is not inspect.Parameter.empty:
            entry["default"] = _describe_value(p.default)
        params.append(entry)
    return params


def _methods(cls):
    methods = {}
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isfunction(member):
            methods[name] = _parameters(member)
        elif isinstance(member, property):
            methods[name] = "property"
    return methods


def _is_own_alias(module, name, value) -> bool:
    """A type alias defined in the module (not a re-export of ``typing``'s own names)."""
    if getattr(typing, name, None) is value:
        return False
    return type(value).__module__ == "typing"


def describe_module(module) -> dict:
    entries = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
            if inspect.isbuiltin(obj) and not name.isupper():
                defined_in = getattr(obj, "__module__", None) or ""
                if not defined_in.startswith("micro_sam"):
                    continue  # math.floor and friends
            defined_in = getattr(obj, "__module__", None)
            entry = {"kind": "class" if inspect.isclass(obj) else "function", "module": defined_in,
                     "params": _parameters(obj)}
            if inspect.isclass(obj) and (defined_in or "").startswith("micro_sam"):
                entry["methods"] = _methods(obj)
            entries[name] = entry
        elif name.isupper() or _is_own_alias(module, name, obj) or name == "sam_model_registry":
            entry = {"kind": "constant", "type": type(obj).__name__}
            if _is_literal(obj):
                entry["value"] = repr(obj)
            elif isinstance(obj, dict):
                entry["keys"] = sorted(map(str, obj))
            entries[name] = entry
    return entries


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python scripts/dump_api_surface.py OUTPUT.json")
    warnings.filterwarnings("ignore")
    import micro_sam

    names = [m.name for m in pkgutil.walk_packages(micro_sam.__path__, "micro_sam.")]
    names = sorted(n for n in names if not any(part.startswith("_") for part in n.split(".")[1:]))
    surface = {"micro_sam_version": micro_sam.__version__, "modules": {}}
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - recorded, not raised: one broken module must not stop the dump
            surface["modules"][name] = {"__error__": repr(error)}
            continue
        surface["modules"][name] = describe_module(module)
    with open(argv[0], "w") as f:
        json.dump(surface, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{len(surface['modules'])} modules of micro_sam {micro_sam.__version__} -> {argv[0]}")


if __name__ == "__main__":
    main()
