"""Typed configs from a YAML file plus dotted command-line overrides.

Every recipe has one dataclass config. ``load_config`` reads YAML (a file, or a preset shipped in
``policyopt/configs/`` named without a path), applies ``a.b.c=value`` overrides, builds the nested
dataclasses (unknown keys and wrong types are errors that name the key), then calls the config's
``validate()`` so bad values and impossible batch geometry fail before any work.

``config_keys`` lists every key of a config with its type, default and meaning; the meaning is the
field's comment in the dataclass source, so a config documents itself (``policyopt CMD --help``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import importlib.resources
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what to change."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, base)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be null")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if dataclasses.is_dataclass(item_tp) and isinstance(value, (str, dict)):
            value = [value]  # one item where a list of them is expected: rewards=file.py:fn
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):  # a section given by its first field alone: {function: accuracy} as accuracy
            value = {dataclasses.fields(tp)[0].name: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.", base=base)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


# what other trainers (TRL's GRPOConfig / PPOConfig, DeepSeekMath's mu) call a key: offered as a did-you-mean
# where the config has the key, never accepted in its place
KEY_ALIASES = {
    "num_generations": "group_size", "num_iterations": "update_epochs", "mu": "update_epochs",
    "num_ppo_epochs": "update_epochs", "ppo_epochs": "update_epochs", "num_mini_batches": "num_minibatches",
    "learning_rate": "optim.lr", "max_completion_length": "sampling.max_new_tokens",
    "max_prompt_length": "data.max_prompt_tokens", "epsilon": "clip_ratio_low", "cliprange": "clip_ratio_low",
    "epsilon_high": "clip_ratio_high", "reward_funcs": "rewards", "kl_coef": "beta", "init_kl_coef": "beta",
    "loss_type": "loss_aggregation", "max_steps": "steps", "save_steps": "save_every", "eval_steps": "eval_every",
    "gradient_accumulation_steps": "grad_accum_steps", "cliprange_value": "clip_value",
}


def _normal(key: str) -> str:
    return "".join(ch for ch in key.lower() if ch.isalnum())


def _suggestion(cls: type, key: str) -> str | None:
    """The key most likely meant by an unknown ``key`` of ``cls``: another trainer's name for it
    (``num_generations`` -> ``group_size``), the same name spelt otherwise (``groupsize``, ``group-size``),
    a key that moved into a section (``lr`` -> ``optim.lr``), else the closest spelling among the keys of
    ``cls`` and of its sections (``group_sise``); None when nothing is close."""
    hints = typing.get_type_hints(cls)
    candidates: dict[str, str] = {f.name: f.name for f in dataclasses.fields(cls)}  # bare name -> dotted key
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            for g in dataclasses.fields(hints[f.name]):
                candidates.setdefault(g.name, f"{f.name}.{g.name}")
    alias = KEY_ALIASES.get(key)
    if alias is not None and alias in candidates.values():
        return alias
    for bare, dotted in candidates.items():
        if _normal(bare) == _normal(key):
            return dotted
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return candidates[close[0]] if close else None


def _build(cls: type[T], data: dict, prefix: str = "", base: Any = None) -> T:
    """``cls`` with the keys in ``data`` set on top of ``base`` (or the class defaults).

    Starting from ``base`` matters for nested sections: a recipe may give a section defaults of its
    own (the demo's ``grpo`` section differs from ``policyopt grpo``), and overriding one key of it
    must keep the others.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(base, cls):
        try:
            base = cls()
        except TypeError:  # required fields (e.g. a reward's function): no defaults to start from
            base = None
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = _suggestion(cls, str(key))
            hint = f" (did you mean {prefix}{close}?)" if close else ""
            raise ConfigError(
                f"unknown config key {prefix}{key}{hint}; valid keys here: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", base=getattr(base, key, None))
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw != "" else ""
        parsed.append((key.strip(), value))
    return parsed


def merge(base: Mapping, override: Mapping) -> dict:
    """``base`` with ``override`` laid over it, section by section (a nested mapping merges, a value replaces)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(cls: type[T], data: Mapping | None, overrides: list[str] | Mapping | None = None) -> T:
    """``cls`` from ``data`` with ``overrides`` on top: ``key=value`` strings or a nested mapping."""
    data = copy.deepcopy(dict(data or {}))  # overrides go into nested sections: leave the caller's intact
    if isinstance(overrides, Mapping):
        data = merge(data, overrides)
    else:
        for key, value in parse_overrides(overrides or []):
            _set_dotted(data, key, value)
    config = _build(cls, data)
    try:
        config.validate()
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return config


# ------------------------------------------------------------------ presets and files


def _presets_dir():
    return importlib.resources.files("policyopt").joinpath("configs")


def preset_names() -> list[str]:
    """The presets shipped in ``policyopt/configs/`` (``--config NAME``)."""
    return sorted(p.name[: -len(".yaml")] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def find_config(path_or_name: str | Path):
    """The YAML file ``--config`` names: an existing file, else the preset of that name (``demo``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = str(path_or_name)
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    presets = ", ".join(preset_names())
    if stem and "/" not in name and "\\" not in name:  # a bare name: a preset
        preset = _presets_dir().joinpath(f"{stem}.yaml")
        if preset.is_file():
            return preset
        close = difflib.get_close_matches(stem, preset_names(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"config file {name} does not exist, and no preset is named {stem!r}{hint}; "
                          f"presets: {presets}")
    raise ConfigError(f"config file {name} does not exist (presets, named without a path: {presets})")


def read_config_file(path_or_name: str | Path) -> dict:
    """The mapping in a YAML config file or preset."""
    path = find_config(path_or_name)
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded or {}


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | Mapping | None = None) -> T:
    """Build ``cls`` from an optional YAML file or preset name and overrides: ``key=value`` strings
    (YAML-typed values) or a nested mapping."""
    data = read_config_file(path) if path is not None else {}
    try:
        return config_from_dict(cls, data, overrides)
    except ConfigError as exc:
        if path is None or (overrides and _builds(cls, data)):
            raise  # the file alone is fine: the overrides are at fault
        raise ConfigError(f"{exc} (in {find_config(path)})") from None


def _builds(cls: type, data: dict) -> bool:
    try:
        config_from_dict(cls, data)
    except ConfigError:
        return False
    return True


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


# ------------------------------------------------------------------ every key, documented by its comment


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One key of a config: its dotted name, its type in words, its default and its one-line meaning."""

    key: str  # dotted: optim.lr, sampling.temperature, model.tiny.hidden_size
    type: str  # e.g. "float", "int or null", "one of linear, cosine, constant_with_warmup"
    default: Any  # the value the config holds (a preset's value when built from one)
    meaning: str  # the field's comment in its dataclass ("" when it has none)
    declared_in: str = ""  # module.Class whose body declares the field (where its comment belongs)


def config_keys(config: Any) -> list[ConfigKey]:
    """Every key of a config dataclass (a class, or an instance for its values), sections in dotted form.

    A nested dataclass is a section whose keys are listed under ``section.``; a list of dataclasses (the
    rewards) is one key. The meaning is the field's trailing ``# comment``, or else the comment lines
    directly above it, in the first class of the MRO that has one (recipe configs inherit fields).
    """
    cls = config if isinstance(config, type) else type(config)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    if isinstance(config, type):
        try:
            config = cls()
        except TypeError:  # required fields: no instance to read defaults from
            config = None
    return list(_keys(cls, config, ""))


def _keys(cls: type, instance: Any, prefix: str):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name) if instance is not None else _field_default(f)
        section = _section_type(hints[f.name], value)
        if section is not None:
            yield from _keys(section, value, f"{prefix}{f.name}.")
        else:
            yield ConfigKey(f"{prefix}{f.name}", describe_type(hints[f.name]), value, field_meaning(cls, f.name),
                            _declared_in(cls, f.name))


def _declared_in(cls: type, name: str) -> str:
    owner = next((k for k in cls.__mro__ if name in vars(k).get("__annotations__", {})), cls)
    return f"{owner.__module__}.{owner.__qualname__}"


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _section_type(tp: Any, value: Any) -> type | None:
    """The dataclass a field's keys come from, or None for a plain key."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if dataclasses.is_dataclass(t)]
        if len(options) == 1 and isinstance(value, options[0]):
            return options[0]
    return None


def describe_type(tp: Any, _in_union: bool = False) -> str:
    """A type in words: ``int``, ``str or null``, ``one of linear, cosine``, ``list of RewardSpec``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        words = [describe_type(t, True) for t in args if t is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is typing.Literal:
        choices = [format_value(c) for c in typing.get_args(tp)]
        return choices[0] if _in_union and len(choices) == 1 else "one of " + ", ".join(choices)
    if origin in (list, tuple):
        (item, *_) = typing.get_args(tp) or (Any,)
        return f"list of {describe_type(item)}"
    if tp is Any:
        return "any"
    return _type_name(tp)


def format_value(value: Any) -> str:
    """A value as it is written in YAML or on the command line (``null``, ``true``, ``1e-3``, lists inline)."""
    if value is dataclasses.MISSING:
        return "(required)"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, (list, tuple)):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def field_meaning(cls: type, name: str) -> str:
    """The comment that documents field ``name`` of ``cls``, from the first class in its MRO that has one."""
    for klass in cls.__mro__:
        meaning = _field_comments(klass).get(name)
        if meaning:
            return meaning
    return ""


@functools.lru_cache(maxsize=None)
def _field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} for the fields annotated in ``cls``'s own class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built in a REPL or by make_dataclass: no source to read
        return {}
    classdef = next((node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)), None)
    if classdef is None:
        return {}
    trailing: dict[int, str] = {}  # line -> a comment after code on that line
    alone: dict[int, str] = {}  # line -> a comment on a line of its own
    code_lines: set[int] = set()
    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        line = token.start[0]
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            (trailing if line in code_lines else alone)[line] = text
        elif token.type not in skip:
            code_lines.update(range(line, token.end[0] + 1))
    comments = {}
    for node in classdef.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        meaning = trailing.get(node.lineno) or trailing.get(node.end_lineno, "")
        if not meaning:
            above, line = [], node.lineno - 1
            while line in alone:
                above.insert(0, alone[line])
                line -= 1
            meaning = " ".join(a for a in above if a)
        comments[node.target.id] = meaning
    return comments
