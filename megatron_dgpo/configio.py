"""Typed configuration: nested dataclasses loaded from YAML plus `a.b=value` CLI overrides.

Every value is checked against the dataclass field's annotation (after `yaml.safe_load` of the
override text), so a typo or a wrong type fails at start-up with the key and the file named,
not halfway through a run. Dataclass `__post_init__` validation runs as the objects are built.
"""
from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml

__all__ = ["ConfigError", "load_config", "from_dict", "config_to_dict", "to_yaml", "format_config",
           "parse_overrides"]


class ConfigError(ValueError):
    pass


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxstring, _repr.maxother = 2, 4, 4, 60, 60


def short(value: Any, limit: int = 120) -> str:
    """repr bounded in depth, width and length: an error message never embeds unbounded input
    (a YAML alias bomb is a few hundred bytes that expand to gigabytes when printed)."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _where(path: str, source: str | None) -> str:
    return f"{path!r}" + (f" (from {source})" if source else "")


def _coerce(value: Any, tp: Any, path: str, source: str | None) -> Any:
    """Return `value` converted to annotation `tp`, or raise ConfigError naming `path`."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for alt in args:
            if alt is type(None):
                continue
            try:
                return _coerce(value, alt, path, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{_where(path, source)}: {short(value)} matches none of {tp}: " + "; ".join(errors)[:300])
    if origin is Literal:
        if value in args and any(type(value) is type(a) for a in args if a == value):
            return value
        raise ConfigError(f"{_where(path, source)}: {short(value)} is not one of {list(args)}")
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(path, source)}: expected a list, got {short(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{_where(path, source)}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(path, source)}: expected a mapping, got {short(value)}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{path}.<key>", source): _coerce(v, vt, f"{path}.{k}", source)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(path, source)}: expected a mapping for {tp.__name__}, got {short(value)}")
        return _build(tp, value, path, source)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{_where(path, source)}: expected null, got {short(value)}")
    if tp is bool:
        # yaml already maps true/false/yes/no; accepting 0/1 would hide a wrong key.
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_where(path, source)}: expected a bool, got {short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{_where(path, source)}: expected an int, got {short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "1e-6" (no dot) as a string; accept it for float fields.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{_where(path, source)}: expected a float, got {short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a version string "1.0" or an id given unquoted
        raise ConfigError(f"{_where(path, source)}: expected a string, got {short(value)}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{_where(path, source)}: expected a path, got {short(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{_where(path, source)}: expected {tp.__name__}, got {short(value)}")
    raise ConfigError(f"{_where(path, source)}: unsupported annotation {tp!r}")


def _build(cls: type, data: dict, prefix: str, source: str | None):
    hints = typing.get_type_hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in flds]
    if unknown:
        full = [f"{prefix}.{k}" if prefix else str(k) for k in unknown]
        raise ConfigError(f"unknown config key(s) {short(full)}" + (f" in {source}" if source else "")
                          + f"; {cls.__name__} accepts {sorted(flds)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], path, source)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        where = (f" at {prefix!r}" if prefix else "") + (f" (from {source})" if source else "")
        raise ConfigError(f"invalid {cls.__name__}{where}: {str(e)[:500]}") from None


def from_dict(cls: type, data: dict, source: str | None = None):
    """Build dataclass `cls` from a plain (nested) dict, type-checking every value."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return _build(cls, data or {}, "", source)


def parse_overrides(overrides: Iterable[str]) -> dict:
    """`["a.b=1", "c=[1,2]"]` -> nested dict; each value is parsed with yaml.safe_load."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(text) if text.strip() else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = nxt
        node[parts[-1]] = value
    return out


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type, yaml_path: str | Path | None = None, overrides: Iterable[str] = ()):
    """Build `cls` from the YAML file (optional) then the `a.b=value` overrides (applied last)."""
    data: dict = {}
    source = None
    if yaml_path is not None:
        source = str(yaml_path)
        try:
            with open(yaml_path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {source}: {e.strerror or e}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: not valid YAML: {str(e)[:300]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    overrides = list(overrides)
    if overrides:
        ov = parse_overrides(overrides)
        # Check the overrides on their own first so an error names the CLI, not the file.
        _check_keys(cls, ov, "", "command-line overrides")
        data = _merge(data, ov)
        source = f"{source} + command-line overrides" if source else "command-line overrides"
    return from_dict(cls, data, source)


def _check_keys(cls: type, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown config key {short(path)} in {source}; {cls.__name__} accepts {sorted(names)}")
        tp = hints[k]
        sub = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
        if isinstance(v, dict) and dataclasses.is_dataclass(sub[0]):
            _check_keys(sub[0], v, path, source)


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists, not tuples; strings, not Paths): round-trips through from_dict."""
    return _plain(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def format_config(cfg: Any, title: str | None = None) -> str:
    """Aligned `a.b.c  value` lines, one per leaf, for the start-up log."""
    rows: list[tuple[str, str]] = []

    def walk(v, prefix):
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(x, f"{prefix}.{k}" if prefix else str(k))
        else:
            rows.append((prefix, repr(v)))

    walk(config_to_dict(cfg), "")
    width = max((len(k) for k, _ in rows), default=0)
    head = [f"== {title or type(cfg).__name__} =="]
    return "\n".join(head + [f"  {k.ljust(width)}  {v}" for k, v in rows])
