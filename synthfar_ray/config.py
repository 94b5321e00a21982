"""YAML configs validated by pydantic, with torchtune-style `dotted.key=value` overrides.

Every stage has one config model (a `StageConfig`). `load_config` reads the YAML, applies the
command-line overrides, and validates; any problem raises `ConfigError` naming the file and field
before any work starts.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from synthfar_ray.errors import UserError
from synthfar_ray.storage import StorageOptions


class ConfigError(UserError, ValueError):
    """A config file, field or override that is not valid."""


class StrictModel(BaseModel):
    # Unknown keys are errors: a typo in a YAML must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageConfig(StrictModel):
    """Fields every stage shares."""

    storage: StorageOptions = StorageOptions()


C = TypeVar("C", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 3 is an int and [1,2] a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a mapping")
            node = child
        node[keys[-1]] = value
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""))
    return "\n".join(lines)


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def validate(model: type[C], data: dict[str, Any], source: str) -> C:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(model: type[C], path: str | None, overrides: list[str] | None = None) -> C:
    """Read YAML at `path` (or start empty), apply overrides, validate against `model`."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    return validate(model, data, path or "<overrides>")


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    """JSON-able dict of a config, secrets masked (for manifests and logs)."""
    return cfg.model_dump(mode="json")
