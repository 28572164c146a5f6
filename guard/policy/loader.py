"""Loading policies from shipped names, files, mappings or Policy objects."""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from guard.errors import format_loc

from .errors import PolicyError
from .schema import Policy

__all__ = ["load_policy", "shipped_policies", "shipped_policy_path"]

_SHIPPED_PACKAGE = "guard._shipped_policies"
_SUFFIXES = (".yaml", ".yml")


def _shipped_dir() -> Path | None:
    """The shipped policies: installed package ``guard._shipped_policies``, or ``<checkout>/policies``."""
    try:
        spec = importlib.util.find_spec(_SHIPPED_PACKAGE)
    except ImportError:
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            if Path(location).is_dir():
                return Path(location)
    checkout = Path(__file__).resolve().parents[2] / "policies"
    return checkout if checkout.is_dir() else None


def shipped_policies() -> list[str]:
    """Names of the policies shipped with memguard (``strict``, ``balanced``, ``monitor``, ...)."""
    folder = _shipped_dir()
    if folder is None:
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix in _SUFFIXES)


def shipped_policy_path(name: str) -> Path:
    """The file of a shipped policy; ``PolicyError`` listing the available names if there is none."""
    folder = _shipped_dir()
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in _SUFFIXES else name
    if folder is not None:
        for suffix in _SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    available = ", ".join(shipped_policies()) or "none found"
    raise PolicyError(
        name, [("", f"no such policy file, and no shipped policy of that name (shipped: {available})")]
    )


def load_policy(source: str | os.PathLike[str] | Policy | Mapping[str, Any]) -> Policy:
    """Load and validate a policy.

    ``source`` may be a Policy (returned as is), a mapping (validated), a path to a YAML file, or the
    bare name of a shipped policy (``"strict"`` or ``"strict.yaml"``). An existing file wins over a
    shipped name. Every failure raises ``PolicyError`` naming the file, the field path and the reason.
    """
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return _validate(source, "<policy mapping>", None)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"policy must be a name, a path, a mapping or a Policy, not {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.is_file():
        looks_like_name = isinstance(source, str) and os.sep not in source and "/" not in source
        if not looks_like_name:
            raise PolicyError(str(source), [("", "file not found")])
        path = shipped_policy_path(source)
    return _load_file(path)


def _load_file(path: Path) -> Policy:
    label = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(str(path), [("", f"cannot read: {err}")]) from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise PolicyError(label, [("", f"invalid YAML: {where}{problem}")]) from err
    if not isinstance(data, Mapping):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise PolicyError(
            label, [("", f"the top level must be a mapping of policy fields, but it is {kind}")]
        )
    return _validate(data, label, path.resolve())


def _validate(data: Mapping[str, Any], label: str, path: Path | None) -> Policy:
    try:
        policy = Policy.model_validate(dict(data))
    except ValidationError as err:
        problems = [(format_loc(e["loc"]), _reason(e, data)) for e in err.errors()]
        raise PolicyError(label, problems) from None
    policy._source = path
    return policy


def _reason(error: Any, data: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        known = _fields_at(error["loc"][:-1])
        hint = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        suggestion = (
            f"; did you mean {hint[0]!r}?" if hint else (f" (known: {', '.join(known)})" if known else "")
        )
        return f"unknown field{suggestion}"
    msg: str = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg[:1].lower() + msg[1:]


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model at ``loc`` in the Policy schema, for 'did you mean' hints."""
    model: Any = Policy
    for part in loc:
        if isinstance(part, int) or part in ("named", "weights"):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    meta = getattr(annotation, "__metadata__", None)
    if meta is not None:
        return _model_of(annotation.__origin__)
    return None
