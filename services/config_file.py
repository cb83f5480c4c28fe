"""Settings from a YAML file under the environment and explicit values (one helper, all services).

Precedence: explicit values (CLI flags) > environment variables > the YAML file > defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def read_yaml_mapping(config: str) -> dict[str, Any]:
    import yaml

    path = Path(config)
    if not path.is_file():
        raise ValueError(f"config: no such file {config!r}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config: {config!r} must hold a mapping of settings")
    return loaded


def load_settings_file(settings_cls: type[S], config: str | None = None, **overrides: Any) -> S:
    """An instance of ``settings_cls`` built from ``config`` (YAML), the environment, overrides."""
    values = read_yaml_mapping(config) if config else {}

    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_):
        return init_settings, env_settings, lambda: values

    # a subclass under the same name, so validation errors name the real settings class
    with_file = type(
        settings_cls.__name__,
        (settings_cls,),
        {"settings_customise_sources": classmethod(settings_customise_sources)},
    )
    return with_file(**overrides)
