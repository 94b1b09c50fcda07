"""The one place a Config is built: a YAML file or a built-in config name, KEY=VALUE overrides, local paths
made absolute, validation that explains what is wrong in one line.

YAML is parsed with `yaml.safe_load` (nothing in a config is executed). A relative path written in a config
file is resolved against the file's folder; one given on the command line (an override, or any path in a
built-in config, which has no folder) against the current directory. Nothing is expanded from environment
variables.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config.schema import Config
from tunelab.errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".yaml", ".yml", ".arrow")


def load_config(source: str | Path, overrides: list[str] | None = None, cwd: Path | None = None) -> Config:
    """A config file or built-in config name -> a validated Config with overrides applied and paths resolved."""
    from tunelab.config.catalog import CATALOG, build_config

    cwd = Path(cwd or Path.cwd())
    path = Path(source)
    text = None
    if path.is_file():
        text = _read_text(path)
        raw, base = _parse_yaml(text, path), path.parent
    elif str(source) in CATALOG:
        raw, base = build_config(str(source)), cwd
    else:
        close = difflib.get_close_matches(str(source), list(CATALOG), n=1)
        hint = (f"; did you mean the built-in config '{close[0]}'?" if close
                else " (tunelab list-cfg lists built-in ones)")
        raise ConfigError(f"config file not found: {source}{hint}")
    _resolve_raw_paths(raw, base)
    for item in overrides or []:
        keys = apply_override(raw, item)
        _resolve_raw_paths(raw, cwd, touched=keys)
    return validate(raw, source=str(source), yaml_text=text, overrides=overrides or [])


def config_name(source: str | Path) -> str:
    """What a run is called: the file's stem, or the built-in config's name."""
    return Path(source).stem if Path(source).is_file() else str(source)


def _parse_yaml(text: str, path: Path) -> dict:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, runtime)")
    return raw


def validate(raw: dict, source: str = "config", yaml_text: str | None = None, overrides: list[str] = ()) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(explain(e, raw, source, yaml_text, overrides)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not KEY=VALUE (for example data.max_length=512)")
    key, value = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override '{item}': empty key part in '{key}'")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return keys, parsed


def apply_override(raw: dict, item: str) -> list[str]:
    """Set a dotted key (data.max_length=512) in the raw config, creating sections as needed. A number indexes
    into a list (data.datasets.0.weight=3). Returns the key's parts."""
    keys, value = parse_override(item)
    node: Any = raw
    for depth, k in enumerate(keys[:-1]):
        key: str | int = _list_index(node, keys, depth, item) if isinstance(node, list) else k
        nxt = node[key] if isinstance(node, list) else node.get(key)
        if not isinstance(nxt, (dict, list)):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[_list_index(node, keys, len(keys) - 1, item) if isinstance(node, list) else keys[-1]] = value
    return keys


def _list_index(items: list, keys: list[str], depth: int, item: str) -> int:
    """The list index that keys[depth] names, or a ConfigError naming the key."""
    listed = ".".join(keys[:depth])
    if not keys[depth].isdigit():
        raise ConfigError(f"override '{item}': '{listed}' is a list; address an item by its index "
                          f"({listed}.0.{'.'.join(keys[depth:])})")
    i = int(keys[depth])
    if i >= len(items):
        raise ConfigError(f"override '{item}': '{listed}' has {len(items)} item(s), so there is no "
                          f"'{listed}.{i}' (indexes start at 0)")
    return i


def explain(err: ValidationError, raw: dict, source: str, yaml_text: str | None, overrides: list[str] = ()) -> str:
    """One line per problem: where (the file's line, or the command line's KEY=VALUE that set it), the dotted key,
    what is wrong, the value given and, for typos, a suggestion."""
    given = {item.split("=", 1)[0].strip(): item for item in overrides}
    lines: list[str] = []
    seen: set[str] = set()
    for e in err.errors():
        loc = [p for p in e["loc"] if not _is_type_tag(p)]
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = f"unknown key '{key}'"
            hint = suggest(loc)
            if hint:
                msg += f"; did you mean '{hint}'?"
        elif e["type"] == "missing":
            msg = f"missing required key '{key}'"
        else:
            text = e["msg"].removeprefix("Value error, ")
            msg = f"{key}: {text} (got {_short(e.get('input'))})" if loc else text
        where = source
        line = find_line(yaml_text, loc) if yaml_text else None
        setter = next((given[k] for k in (".".join(str(p) for p in loc[:i]) for i in range(len(loc), 0, -1))
                       if k in given), None)
        if setter is not None:  # the last word was the command line's
            where = f"command line '{setter}'"
        elif line:
            where = f"{source}:{line}"
        full = f"{where}: {msg}"
        if full not in seen:
            seen.add(full)
            lines.append(full)
    return "\n".join(lines[:8])


def suggest(loc: list) -> str | None:
    """The closest valid key to a misspelt one, as a dotted path."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            if isinstance(part, int):
                continue
            return None
        model = _section_type(field.annotation) or model
    names = list(model.model_fields)
    match = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
    if not match:
        return None
    return ".".join([str(p) for p in loc[:-1]] + [match[0]])


def find_line(yaml_text: str, loc: list) -> int | None:
    """1-based line of a dotted key in the YAML text, if it is there."""
    try:
        node = yaml.compose(yaml_text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _path_slots(raw: dict) -> list[tuple[tuple[str, ...], dict]]:
    """Where a raw config holds local paths: model.path, data.path, data.datasets.N.path (key parts, holder)."""
    slots = []
    for section in ("model", "data"):
        node = raw.get(section)
        if isinstance(node, dict) and "path" in node:
            slots.append(((section, "path"), node))
    datasets = raw.get("data", {}).get("datasets") if isinstance(raw.get("data"), dict) else None
    for i, d in enumerate(datasets if isinstance(datasets, list) else []):
        if isinstance(d, dict) and "path" in d:
            slots.append((("data", "datasets", str(i), "path"), d))
    return slots


def _resolve_raw_paths(raw: dict, base: Path, touched: list[str] | None = None) -> None:
    """Make the local paths of a raw config absolute against `base`; with `touched` (an override's key parts),
    only the paths that override set. Hub ids, the default-model alias and wrong types are left alone."""
    base = base.resolve()
    for keys, holder in _path_slots(raw):
        if touched is not None:
            n = min(len(keys), len(touched))
            if tuple(touched[:n]) != keys[:n]:
                continue
        value = holder["path"]
        if keys[0] == "model":
            if isinstance(value, str) and value and (base / value).exists():
                holder["path"] = str((base / value).resolve())
        elif isinstance(value, (str, list)):
            holder["path"] = _resolve_data_path(value, base)


def _resolve_data_path(p: Any, base: Path) -> Any:
    if isinstance(p, list):
        return [_resolve_data_path(x, base) for x in p]
    if not isinstance(p, str) or not p:
        return p
    path = Path(p)
    if path.is_absolute():
        return p
    cand = base / path
    if cand.exists():
        return str(cand.resolve())
    if HUB_ID.match(p) and not p.endswith(_FILE_SUFFIXES):
        return p  # a hub dataset id: `datasets` fetches it (needs network)
    return str(cand.resolve())


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found:
            return found
    return None


def _is_type_tag(p: Any) -> bool:
    # pydantic adds the union member it tried to the error location ("str", "list[str]", "literal[...]").
    return isinstance(p, str) and (p in {"str", "int", "float", "bool", "none"} or "[" in p or p.startswith(
        ("function-", "literal", "tuple", "list", "LoraSettings", "DatasetSpec", "dict")))


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
