"""Command-line options derived from a parameter model's fields, never written by hand.

    add_model_options(parser, JobSpec)          # --input, --output, ..., --stages JSON
    spec = model_from_args(JobSpec, args)       # only what was given: the model's defaults rule
    add_nested_options(parser, TrainingDataSpec, "filters", ("min_avg_logprob",))
    #   --min-avg-logprob X: the same as --filters '{"min_avg_logprob": X}'

Each field `name` becomes `--name` (underscores as dashes) with the field's description and
default as its help. How a value is read follows the field's type: a flag for a bool, one of
the choices for a Literal, comma-separated for a list of strings (or of a Literal's strings),
JSON for a nested model, a dataclass or a dict, and the text as given otherwise (pydantic
converts numbers). Unset options are left out, so the model's own defaults apply: the defaults
live in one place. A field of a nested model (a key of `--filters` JSON) may also be an option
of its own (`--min-avg-logprob`), read the same way; the same key given both ways is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipelines.errors import ConfigError


def _bare(annotation: Any) -> Any:
    """The annotation without its `Annotated` and `| None` wrappers, at any depth."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _bare(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _bare(kept[0]) if len(kept) == 1 else annotation
    return annotation


def _is_name(annotation: Any) -> bool:
    """A string, or one of a Literal's strings."""
    return annotation is str or (typing.get_origin(annotation) is Literal and all(
        isinstance(a, str) for a in typing.get_args(annotation)))


def option_kind(field: FieldInfo) -> str:
    """How the option of `field` reads its value: flag, choice, list, json or text."""
    annotation = _bare(field.annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "flag"
    if origin is Literal:
        return "choice"
    if origin is list and _is_name(typing.get_args(annotation)[0]):
        return "list"
    if origin in (dict, list) or annotation is dict or (isinstance(annotation, type) and (
            issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation))):
        return "json"
    return "text"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown_default(field: FieldInfo) -> str:
    """The default as a user would type it."""
    default = field.get_default(call_default_factory=True)
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return ",".join(map(str, default))
    if isinstance(default, BaseModel):  # what is set, without the empty parts
        shown = {k: v for k, v in default.model_dump(mode="json", exclude_none=True).items()
                 if v != {}}
        return json.dumps(shown)
    if dataclasses.is_dataclass(default):
        return json.dumps(dataclasses.asdict(default))
    if isinstance(default, dict):
        return json.dumps(default)
    return str(default)


def help_text(field: FieldInfo) -> str:
    description = (field.description or "").replace("%", "%%")
    if field.is_required():
        return description
    return f"{description} (default: {shown_default(field).replace('%', '%%')})"


def _add_option(parser: argparse.ArgumentParser, name: str, field: FieldInfo,
                dest: str) -> None:
    kind = option_kind(field)
    kwargs: dict[str, Any] = {"dest": dest, "help": help_text(field),
                              "default": argparse.SUPPRESS}
    if kind == "flag":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind == "choice":
        kwargs["choices"] = typing.get_args(_bare(field.annotation))
    else:
        kwargs["metavar"] = {"json": "JSON", "list": "A,B"}.get(kind, name.upper())
    if field.is_required():
        kwargs["required"] = True
    parser.add_argument(flag(name), **kwargs)


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel],
                      skip: tuple[str, ...] = ()) -> None:
    """One option per field of `model` (less `skip`), as the module docstring says."""
    for name, field in model.model_fields.items():
        if name not in skip and not field.exclude:
            _add_option(parser, name, field, name)


def _nested_model(model: type[BaseModel], name: str) -> type[BaseModel]:
    return _bare(model.model_fields[name].annotation)


def add_nested_options(parser: argparse.ArgumentParser, model: type[BaseModel], field: str,
                       names: tuple[str, ...]) -> None:
    """`--<name>` for each of `names`, fields of the model in `model`'s `field`, as options of
    their own (their value goes to that key of `field`; `model_from_args`)."""
    nested = _nested_model(model, field)
    for name in names:
        _add_option(parser, name, nested.model_fields[name], f"{field}.{name}")


def _value(field: FieldInfo, text: Any, name: str) -> Any:
    kind = option_kind(field)
    if kind == "list":
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind == "json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:  # the position, never the text (it may hold a key)
            raise ConfigError(f"{flag(name)} is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{flag(name)} must be a JSON object")
        return value
    return text


def _nested_given(model: type[BaseModel], args: argparse.Namespace,
                  given: dict[str, Any]) -> set[tuple[str, str]]:
    """The nested options given (`add_nested_options`), put into their field's dict in
    `given`; (field, name) of each. A key also in the field's JSON is a ConfigError."""
    own = set()
    for dest, text in vars(args).items():
        field, _, name = dest.partition(".")
        if not name or field not in model.model_fields:
            continue
        values = given.setdefault(field, {})
        if name in values:
            raise ConfigError(f"{flag(name)} and {flag(field)}' {name} are both given; give "
                              "one of them")
        values[name] = _value(_nested_model(model, field).model_fields[name], text, name)
        own.add((field, name))
    return own


def model_from_args(model: type[BaseModel], args: argparse.Namespace, **fixed: Any):
    """`model` from the options given (and `fixed` values); a ConfigError names the option."""
    given = {name: _value(field, getattr(args, name), name)
             for name, field in model.model_fields.items() if hasattr(args, name)}
    own = _nested_given(model, args, given)
    try:
        return model.model_validate({**given, **fixed})
    except ValidationError as exc:
        raise ConfigError(option_error(exc, own)) from None


def option_error(exc: ValidationError, own: set[tuple[str, str]] = frozenset()) -> str:
    """A ValidationError's first error as one line naming the option it came from
    (`--stages label.batch_size: ...`; `--min-avg-logprob: ...` for a nested field given as
    an option of its own, one of `own`); messages carry no input values."""
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    loc = [str(part) for part in error["loc"]]
    if not loc:
        return message
    if tuple(loc[:2]) in own:
        loc = loc[1:]
    return f"{flag(loc[0])} {'.'.join(loc[1:])}: {message}" if loc[1:] else \
        f"{flag(loc[0])}: {message}"
