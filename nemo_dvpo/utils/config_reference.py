"""A Markdown reference of a config dataclass: every setting's dotted name, type, default and meaning.

The dataclasses are the one place a setting and its default are defined, and the comment written above a
field in its class is its documentation; this module reads both so that ``docs/configuration.md`` cannot
say something the code does not (``tools/config_reference.py`` writes it, a test checks it is current).

A field's meaning is the comment block directly above it, or its trailing comment (each field has its own:
a comment written above two fields would document only the first); a subclass that redefines a field
without a comment keeps its base class's. Defaults are
read from a default instance, so a nested dataclass whose factory sets some fields (``rollout.sampling`` is
``SamplingConfig(max_new_tokens=64, ...)``) shows what a run really gets.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from nemo_dvpo.utils.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Setting:
    """One leaf setting: ``name`` is its dotted key on the command line (``rollout.sampling.top_k``)."""

    name: str
    type: str
    default: Any
    meaning: str
    required: bool = False


def _class_field_comments(klass: type) -> dict[str, str]:
    """The comments of the fields ``klass`` itself annotates (not inherited ones)."""
    try:
        lines, _ = inspect.getsourcelines(klass)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    lines = source.splitlines()
    tree = ast.parse(source)
    body = tree.body[0].body  # the class statement's body
    comments: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 2  # 0-based index of the line above the field
        while row >= 0 and lines[row].strip().startswith("#"):
            above.append(lines[row].strip().lstrip("#").strip())
            row -= 1
        text = " ".join(reversed(above)).strip()
        trailing = _trailing_comment(lines[node.end_lineno - 1])
        if trailing:
            text = f"{text} {trailing}".strip()
        comments[node.target.id] = text
    return comments


def _trailing_comment(line: str) -> str:
    """The ``# ...`` at the end of a source line, outside strings ('' when none)."""
    try:
        for token in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if token.type == tokenize.COMMENT:
                return token.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return ""
    return ""


def field_comments(cls: type) -> dict[str, str]:
    """Every field's meaning, from ``cls`` and its base dataclasses (the nearest class with a comment wins)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for name, text in _class_field_comments(klass).items():
                if text or name not in comments:
                    comments[name] = text
    return comments


def describe_type(hint: Any) -> str:
    """A YAML reader's name for a type hint: ``int``, ``str or null``, ``"none" | "full"``, ``mapping``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin is Union:
        named = [describe_type(arg) for arg in args if arg is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if hint is dict or origin is dict:
        return "mapping"
    if origin in (list, tuple) or hint in (list, tuple):
        return f"list of {describe_type(args[0])}" if args else "list"
    if hint is typing.Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def format_value(value: Any) -> str:
    """A default as it would be written in YAML / on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def settings_of(cls: type, instance: Any = None, prefix: str = "") -> Iterator[Setting]:
    """Every leaf setting of dataclass ``cls`` (nested dataclasses expanded into dotted names).

    ``instance``: the default object whose values are shown (a nested dataclass's factory may differ from
    its class defaults). A required field of a dataclass type is one required row (e.g. ``model``, whose shape
    comes from a preset and is documented on its own).
    """
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        name, hint = prefix + field.name, hints[field.name]
        meaning = comments.get(field.name, "")
        if instance is not None:
            value, required = getattr(instance, field.name), False
        elif field.default is not dataclasses.MISSING:
            value, required = field.default, False
        elif field.default_factory is not dataclasses.MISSING:
            value, required = field.default_factory(), False
        else:
            value, required = None, True
        nested = hint if dataclasses.is_dataclass(hint) else None
        if nested is not None and not required:
            yield from settings_of(nested, value, f"{name}.")
            continue
        yield Setting(name, describe_type(hint), value, meaning, required)


def undocumented(settings: list[Setting]) -> list[str]:
    return [setting.name for setting in settings if not setting.meaning]


def yaml_overrides(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings a conf YAML file overrides, flattened to dotted keys, and its defaults-list choices.

    Returns (``{"rollout.prompts_per_step": 16, ...}``, ``{"model": "smollm2_135m"}``); Hydra's own keys
    (``hydra``, ``defaults``' ``_self_`` and ``override`` entries, the ``*_defaults`` schema) are left out.
    """
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    choices = {}
    for entry in raw.pop("defaults", []) or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if not key.startswith("override "):
                    choices[key] = value
    raw.pop("hydra", None)
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(raw, "")
    return flat, choices


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _prose(text: str) -> str:
    """A comment as a table cell: its first letter capitalised, ``<name>`` kept from becoming an HTML tag."""
    text = _cell(text).replace("<", "&lt;").replace(">", "&gt;")
    return text[:1].upper() + text[1:]


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def settings_table(settings: list[Setting], overrides: dict[str, Any], choices: dict[str, str],
                   where: str) -> list[str]:
    """Markdown rows: setting, type, default, the embedded default's value where its YAML overrides it, meaning.

    Every override must name a setting (``where`` names the YAML file in the error); overrides of keys
    below a mapping-typed setting (``gvm_training.train.steps``) are shown on that setting's row.
    """
    names = {setting.name for setting in settings}
    mapping_settings = {setting.name for setting in settings if setting.type == "mapping"}
    by_setting: dict[str, list[str]] = {}
    for key, value in overrides.items():
        if key in names:
            by_setting.setdefault(key, []).append(format_value(value))
            continue
        owner = next((name for name in mapping_settings if key.startswith(name + ".")), None)
        if owner is None:
            raise ConfigError(f"{where}: '{key}' is not a setting of this recipe")
        by_setting.setdefault(owner, []).append(f"{key[len(owner) + 1:]}={format_value(value)}")
    for group, choice in choices.items():
        by_setting.setdefault(group, []).append(f"{choice} (preset)")
    rows = ["| setting | type | default | embedded default | meaning |", "|---|---|---|---|---|"]
    for setting in settings:
        default = "required" if setting.required else _code(format_value(setting.default))
        embedded = ", ".join(_code(_cell(value)) for value in by_setting.get(setting.name, []))
        rows.append(f"| `{setting.name}` | {_cell(setting.type)} | {_cell(default)} | {embedded} | "
                    f"{_prose(setting.meaning)} |")
    return rows
