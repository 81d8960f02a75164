"""Typed configs: dataclasses filled from YAML/dicts with ``key=value`` overrides and errors that name the key.

cfg = load_config(TrainConfig, "configs/tiny.yaml", ["optim.lr=1e-3", "model.embed_dim=64"])
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key at fault."""


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {tp}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(get_args(tp))}, not {value!r}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg, *_) = get_args(tp) or (Any,)
        items = [_convert(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(kt, k, key): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming the key."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    dot = f"{prefix}." if prefix else ""
    if unknown:
        raise ConfigError(f"{dot}{unknown[0]}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, f"{dot}{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b.c=value`` strings (value parsed as YAML) applied onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides look like key.path=value")
        path, raw = item.split("=", 1)
        node = data
        *parents, last = path.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {p} is not a mapping")
        node[last] = yaml.safe_load(raw)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    return from_dict(cls, apply_overrides(data, overrides or []))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# ------------------------------------------------------------------------------------------------- documentation
@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One documented config key: its dotted name, type, default, the attribute docstring it was declared with,
    and (when describing a config instance) its value."""

    key: str
    type: str
    default: str
    doc: str
    value: str | None = None


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: the string literal right below each field (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin in (list, tuple):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return f"mapping[{_type_name(args[0])}, {_type_name(args[1])}]" if args else "mapping"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(list(value) if isinstance(value, tuple) else value, default=str)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _show(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "section" if dataclasses.is_dataclass(value) else _show(value)
    return "required"


def _section(tp: Any) -> tuple[type, bool] | None:
    """(dataclass, named) of a field whose value holds more keys: a dataclass or an optional one (named False), or
    a mapping of names to one (named True: ``model.towers.<modality>``)."""
    for arg in (tp, *get_args(tp)):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg, False
        if get_origin(arg) is dict and dataclasses.is_dataclass(get_args(arg)[1]):
            return get_args(arg)[1], True
    return None


_UNSET = object()


def describe(cls: type, prefix: str = "", config: Any = _UNSET) -> list[KeyDoc]:
    """Every key of config dataclass ``cls``, depth first in declaration order. A field that holds a section is
    listed once (documented by its docstring or its class's) and then its keys; a mapping of named sections as
    ``model.towers.<modality>.kind``. With ``config`` (an instance of ``cls``) every key carries its value, and the
    named sections are the ones it has (``model.towers.text.kind``, ...)."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, tp, default = f"{prefix}{f.name}", hints[f.name], _default(f)
        value = _UNSET if config is _UNSET else getattr(config, f.name)
        shown = None if value is _UNSET else ("section" if value is not None and _section(tp) else _show(value))
        section = _section(tp)
        if section is None:
            out.append(KeyDoc(key, _type_name(tp), default, docs.get(f.name, ""), shown))
            continue
        sub, named = section
        doc = docs.get(f.name) or " ".join((sub.__doc__ or "").split())
        if named or default in ("null", "required"):  # optional and named sections are keys themselves
            out.append(KeyDoc(key, _type_name(tp), default, doc, shown))
        if not named:
            if value is _UNSET or value is not None:
                out += describe(sub, f"{key}.", value)
        elif value is _UNSET:
            out += describe(sub, f"{key}.<{f.metadata.get('key', 'name')}>.")
        else:
            for name, entry in value.items():
                out += describe(sub, f"{key}.{name}.", entry)
    return out


def reference(cls: type, config: Any = None) -> str:
    """A markdown table of every key of ``cls`` (what ``accord train --print-config`` prints); with ``config``, an
    instance, a column of its values."""
    rows = describe(cls) if config is None else describe(cls, config=config)
    header = ["key", "type", "default", "meaning"] + (["value"] if config is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for d in rows:
        cells = [f"`{d.key}`", d.type.replace("|", "\\|"), f"`{d.default}`", d.doc.replace("|", "\\|")]
        if config is not None:
            cells.append(f"`{d.value}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(value: int | str, key: str) -> int:
    """``20GB``, ``512MiB``, ``1000000`` -> bytes; a bad value is a ConfigError naming ``key``."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"{key}: {value!r} is not a size (e.g. 20GB, 512MiB, 1000000)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])
