"""The one configuration loader: where every setting's value comes from, and how a bad one is reported.

Sources, highest first: the process environment, then the dotenv file named by `--config` or
`SEGMENT_WORKER_CONFIG`, then each field's default. The CLI reads them once (`read_sources`) and
every settings object of the product (`Section` subclasses: core, Kafka properties, sink, collector,
each destination's) is built from that same mapping, so nothing below the CLI reads `os.environ`.

A value that does not validate raises `ConfigError` with one line naming the variable; the CLI
prints it and exits 2. Secret fields (`SecretStr`) never have their value echoed.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import orjson
from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from pydantic_settings import NoDecode

CONFIG_FILE_VARIABLE = "SEGMENT_WORKER_CONFIG"

Sources = Mapping[str, str]  # VARIABLE_NAME (upper case) -> raw text


class ConfigError(ValueError):
    """A setting that cannot be used; its message is one line that names the variable."""


# Exit code of a role refused at start-up for its configuration (as click's usage errors); the
# `--processes` supervisor reads it too, as the one failure no restart cures.
CONFIG_EXIT_CODE = 2


def read_sources(environ: Mapping[str, str], config_file: str | None = None) -> dict[str, str]:
    """The environment over the dotenv file (`config_file`, else `SEGMENT_WORKER_CONFIG`)."""
    merged: dict[str, str] = {}
    path = config_file or environ.get(CONFIG_FILE_VARIABLE)
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        merged.update({name.upper(): value for name, value in dotenv_values(path).items() if value is not None})
    merged.update({name.upper(): value for name, value in environ.items()})
    return merged


def _decodes_json(annotation: Any, metadata: list[Any]) -> bool:
    """Dicts and lists are JSON in a variable, unless the field parses its own text (NoDecode)."""
    if any(isinstance(m, NoDecode) or m is NoDecode for m in metadata):
        return False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_decodes_json(arg, []) for arg in typing.get_args(annotation) if arg is not type(None))
    return origin in (dict, list, set, tuple) or annotation in (dict, list, set, tuple)


class Section(BaseModel):
    """A group of settings read from variables named `env_prefix` + FIELD_NAME.

    Constructed directly (`SinkSettings(concurrency=2)`) it is a plain validated model; built
    with `from_sources` it takes its values from the configuration sources.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    env_prefix: ClassVar[str] = ""

    @classmethod
    def variable(cls, field: str) -> str:
        return f"{cls.env_prefix}{field}".upper()

    @classmethod
    def from_sources(cls, sources: Sources) -> Self:
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            variable = cls.variable(name)
            if variable not in sources:
                continue
            raw: Any = sources[variable]
            if isinstance(raw, str) and _decodes_json(field.annotation, field.metadata):
                try:
                    raw = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise ConfigError(f"{variable}: not valid JSON ({exc})") from None
            values[name] = raw
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(cls._describe(exc, sources)) from None

    @classmethod
    def _describe(cls, exc: ValidationError, sources: Sources) -> str:
        """The first error as `VARIABLE=value: what is wrong` (secrets shown as ***)."""
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a check across fields: its message names the variables itself
            return message
        field = str(error["loc"][0])
        variable = cls.variable(field)
        if field not in cls.model_fields or variable not in sources:
            return f"{variable}: {message}"
        shown = "***" if _is_secret(cls.model_fields[field].annotation) else sources[variable]
        return f"{variable}={shown}: {message}"


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_is_secret(arg) for arg in typing.get_args(annotation))


def split_csv(value: object) -> object:
    """`a, b,,c` -> ["a", "b", "c"]; anything that is not text is left to the field's type."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value
