"""One typed configuration mechanism for every stage.

Every stage's settings are a dataclass (nested dataclasses for sections) whose field
annotations are the schema and whose defaults are the measured defaults. `load_config` builds
one from its defaults, then applies each source in order (a mapping, or a YAML/JSON file), then
the command-line overrides, so files and CLI options are merged by the same code:

    config = load_config(BuildConfig, "build.yaml", overrides={"cell_image_px": 96})
    config = load_config(SpatiaConfig, {"train": {"lr": 1e-4}}, overrides={"train.max_steps": 600})

Unknown keys and wrong types are refused with the key's dotted path and the file it came from.
A config class may define `validate(self) -> None`, raising `ConfigError` for rules between
fields; the loader calls it (innermost sections first) and adds the source to the message.
`config_to_dict` and `save_config` give back plain data that `load_config` reads unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from spatia.errors import ConfigError

T = TypeVar("T")

CLI_SOURCE = "command-line options"


def load_config(cls: type[T], *sources: Mapping[str, Any] | str | Path | None,
                overrides: Mapping[str, Any] | None = None, base: T | None = None) -> T:
    """Build a validated `cls`: defaults (or `base`), then each source, then `overrides`.

    sources: mappings (nested, or with dotted keys) or paths of YAML/JSON files; None skipped.
    overrides: CLI options as {"section.key": value} or nested; None values are skipped (an
        option the user did not give).
    """
    layers: list[tuple[dict[str, Any], str]] = []
    for source in sources:
        if source is not None:
            layers.append(read_config_source(source))
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if given:
        layers.append((given, CLI_SOURCE))
    config = base if base is not None else _defaults(cls, layers)
    for data, where in layers:
        config = merge_config(config, data, source=where)
    validate_config(config, source=" and ".join(where for _, where in layers if where != "<mapping>") or "<config>")
    return config


def _defaults(cls: type[T], layers: list[tuple[dict[str, Any], str]]) -> T:
    """`cls()`, with its required fields (those without a default) taken from the layers."""
    required = [f for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if not required:
        return cls()
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for data, where in layers:
        nested = _nest(data, "", where)
        for f in required:
            if f.name in nested:
                values[f.name] = coerce_value(nested[f.name], hints[f.name], f.name, where)
    missing = [f.name for f in required if f.name not in values]
    if missing:
        raise ConfigError(f"required setting(s) {', '.join(repr(m) for m in missing)} not given",
                          path=_path(layers[-1][1]) if layers else None,
                          fix="give them in the config file or as command-line options")
    try:
        return cls(**values)
    except ConfigError as error:
        raise _with_source(error, layers[-1][1]) from None


def read_config_source(source: Mapping[str, Any] | str | Path) -> tuple[dict[str, Any], str]:
    """A source as (plain dict, description): a mapping as it is, a file parsed as YAML/JSON."""
    if isinstance(source, Mapping):
        return dict(source), "<mapping>"
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError("config file not found", path=path, fix="give the path of an existing YAML or JSON file")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the config file ({error})", path=path,
                          fix="correct the YAML/JSON syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("a config file must be a mapping of keys to values", path=path,
                          fix="write 'key: value' lines (YAML) or a JSON object")
    return data, str(path)


def merge_config(base: T, data: Mapping[str, Any], *, source: str = "<mapping>", prefix: str = "") -> T:
    """A copy of dataclass instance `base` with `data` applied, keys and types checked."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of keys", path=_path(source),
                          fix="indent its keys under it")
    nested = _nest(data, prefix, source)
    fields = {f.name: f for f in dataclasses.fields(base) if f.init}
    hints = typing.get_type_hints(type(base))
    updates: dict[str, Any] = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown key '{dotted}'", path=_path(source),
                              fix=f"valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: "
                                  f"{', '.join(sorted(fields))}")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            updates[key] = merge_config(current, value, source=source, prefix=f"{dotted}.")
        else:
            updates[key] = coerce_value(value, hints[key], dotted, source)
    try:
        return dataclasses.replace(base, **updates)
    except ConfigError as error:  # a __post_init__ check: add where the values came from
        raise _with_source(error, source) from None


def _nest(data: Mapping[str, Any], prefix: str, source: str) -> dict[str, Any]:
    """{"a.b": 1, "a": {"c": 2}} -> {"a": {"b": 1, "c": 2}} (dotted keys are CLI overrides)."""
    nested: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"key {key!r} under '{prefix.rstrip('.') or 'config'}' is not a name",
                              path=_path(source), fix="use text keys")
        head, _, rest = key.partition(".")
        if rest:
            value = {rest: value}
        if head in nested and isinstance(nested[head], dict) and isinstance(value, Mapping):
            nested[head] = {**nested[head], **value}
        else:
            nested[head] = dict(value) if isinstance(value, Mapping) and rest else value
    return nested


def coerce_value(value: Any, hint: Any, dotted: str, source: str) -> Any:
    """`value` checked against annotation `hint` (ints become floats, lists become tuples)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce_value(value, option, dotted, source)
            except ConfigError:
                continue
        _wrong(value, hint, dotted, source)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if any(value == allowed and type(value) is type(allowed) for allowed in typing.get_args(hint)):
            return value
        raise ConfigError(f"'{dotted}' must be one of {', '.join(map(repr, typing.get_args(hint)))}, not {value!r}",
                          path=_path(source), fix=f"set '{dotted}' to one of the listed values")
    if hint is bool:
        if isinstance(value, bool):
            return value
        _wrong(value, hint, dotted, source)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _wrong(value, hint, dotted, source)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        _wrong(value, hint, dotted, source)
    if hint is str:
        if isinstance(value, str):
            return value
        _wrong(value, hint, dotted, source)
    if hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        _wrong(value, hint, dotted, source)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"'{dotted}' must be one of {', '.join(repr(m.value) for m in hint)}, not {value!r}",
                              path=_path(source), fix=f"set '{dotted}' to one of the listed values") from None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return merge_config(hint(), value, source=source, prefix=f"{dotted}.")
        _wrong(value, hint, dotted, source)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            _wrong(value, hint, dotted, source)
        args = typing.get_args(hint)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"'{dotted}' must have {len(args)} items, not {len(value)}", path=_path(source),
                                  fix=f"give {len(args)} values")
            return tuple(coerce_value(v, a, f"{dotted}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce_value(v, item, f"{dotted}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            _wrong(value, hint, dotted, source)
        args = typing.get_args(hint)
        key_hint, value_hint = args if args else (Any, Any)
        return {coerce_value(k, key_hint, f"{dotted} key", source): coerce_value(v, value_hint, f"{dotted}.{k}", source)
                for k, v in value.items()}
    raise TypeError(f"config field '{dotted}' has an annotation the loader does not handle: {hint!r}")


def _wrong(value: Any, hint: Any, dotted: str, source: str) -> typing.NoReturn:
    name = _type_name(hint)
    raise ConfigError(f"'{dotted}' must be {name}, not {value!r}", path=_path(source),
                      fix=f"set '{dotted}' to {name}")


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (tuple, list):
        return f"a list of {_type_name(typing.get_args(hint)[0]) if typing.get_args(hint) else 'values'}"
    if dataclasses.is_dataclass(hint):
        return "a mapping of keys"
    article = {"int": "an int", "float": "a float", "bool": "a bool (true/false)", "str": "a string"}
    name = getattr(hint, "__name__", str(hint))
    return article.get(name, name)


def validate_config(config: Any, *, source: str = "<config>") -> None:
    """Call `validate()` on every section, innermost first; errors name `source`."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_config(value, source=source)
    check = getattr(config, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as error:
            raise _with_source(error, source) from None


def _with_source(error: ConfigError, source: str) -> ConfigError:
    if error.path is None and _path(source) is not None:
        return type(error)(error.problem, path=_path(source), fix=error.fix)
    return error


def _path(source: str) -> str | None:
    return None if source in ("<mapping>", "defaults") else source


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested data (tuples as lists, paths and enums as text) that `load_config` reads back."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, enum.Enum):
            return value.value
        return value

    return plain(config)


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically; an existing file is replaced)."""
    from spatia.outputs import atomic_output

    path = Path(path)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(config_to_yaml(config))
    return path
