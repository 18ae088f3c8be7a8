"""Reading a typed config: a dataclass schema, YAML files (with `defaults:`) on top, then `key=value`
overrides; every mistake one `ConfigError` naming the file and key. Shared by the data pipeline and the
trainer (`pretrain.config`), and free of torch, so data jobs start fast.

A YAML may list `defaults:` (other YAML files, relative to `configs/`, merged first in order); its own
keys come next, then the overrides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A user mistake in a config file or an override; the message names the key."""


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A YAML path as given, or relative to `configs/`, or a preset name like `llama1-7b`: its experiment
    (`configs/experiments/llama1-7b.yaml`: model, training recipe and token budget) when there is one,
    else its model preset alone."""
    path = Path(name)
    candidates = [path, CONFIGS_DIR / path, CONFIGS_DIR / f"{path}.yaml"]
    if len(path.parts) == 1 and not path.suffix:
        candidates += [CONFIGS_DIR / "experiments" / f"{path}.yaml", CONFIGS_DIR / "model" / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config file not found: {name} (looked in ., in {CONFIGS_DIR}, and for a bare name in its "
        "experiments/ and model/)"
    )


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The YAML at `path` preceded by its `defaults`, each paired with the file it came from."""
    if path in seen:
        raise ConfigError(f"{path}: circular defaults through {' -> '.join(map(str, seen))}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    layers: list[tuple[str, DictConfig]] = []
    defaults = node.pop("defaults", [])
    for entry in defaults:
        layers += _load_yaml(resolve_config_path(str(entry)), seen + (path,))
    layers.append((str(path), node))
    return layers


def _merge(base: DictConfig, layer: DictConfig, origin: str) -> DictConfig:
    """Merge `layer` into the typed `base`, turning OmegaConf's errors into one line naming the key."""
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0]
        if "not in" in reason or "Key" in type(e).__name__:
            raise ConfigError(f"{origin}: unknown config key '{key}'") from None
        raise ConfigError(f"{origin}: bad value for '{key}': {reason}") from None
    except TypeError as e:  # e.g. a scalar merged onto a list
        raise ConfigError(f"{origin}: {e}") from None


def load_structured(schema: type, path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Any:
    """An instance of the dataclass `schema`: its defaults <- YAML (with its defaults) <- overrides."""
    cfg = OmegaConf.structured(schema)
    if path is not None:
        for origin, layer in _load_yaml(resolve_config_path(path)):
            cfg = _merge(cfg, layer, origin)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    try:
        OmegaConf.resolve(cfg)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
