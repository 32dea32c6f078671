"""Typed config dataclasses from OmegaConf / dict input, validated with errors that name the field."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from nemo_dvpo.utils.errors import ConfigError

T = TypeVar("T")


def _to_plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _describe(expected: Any) -> str:
    origin = get_origin(expected)
    if origin is Literal:
        return " or ".join(repr(choice) for choice in get_args(expected))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in get_args(expected))
    if expected is type(None):
        return "null"
    return getattr(expected, "__name__", str(expected))


def _coerce(value: Any, expected: Any, where: str) -> Any:
    origin = get_origin(expected)
    if expected is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(expected):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{where}: expected {_describe(expected)}, got {value!r}")
    if expected is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(expected):
            return value
        raise ConfigError(f"{where}: expected {_describe(expected)}, got {value!r}")
    if dataclasses.is_dataclass(expected):
        return from_dict(expected, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = get_args(expected) or (Any,)
        return [_coerce(item, item_type, f"{where}[{index}]") for index, item in enumerate(value)]
    if origin is dict or expected is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if expected is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ``ConfigError``.

    ``where`` names the config section (e.g. ``"model"``) so messages read ``model.hidden_size: ...``.
    """
    data = _to_plain(data)
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name} is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from error


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def defaults_of(cls: type, exclude: tuple[str, ...] = ()) -> dict:
    """Every field of dataclass ``cls`` with its default (nested dataclasses included), as plain data.

    The dataclasses are the one place defaults live; Hydra composes this under the entry point's YAML,
    which then holds only the overrides of the embedded default run. A required dataclass field (``model``:
    its shape comes from a preset) contributes the fields that have defaults, so that e.g.
    ``model.activation_recompute=full`` overrides a preset that does not mention it.
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in exclude or not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        elif dataclasses.is_dataclass(hints[field.name]):
            value = defaults_of(hints[field.name])
        else:
            continue
        values[field.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return values


def register_defaults(name: str, cls: type) -> None:
    """Make ``cls``'s defaults a Hydra config named ``name`` (``defaults: [name, ...]`` in a YAML file)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=defaults_of(cls))
