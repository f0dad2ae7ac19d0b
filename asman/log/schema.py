"""The job definition's schema, once: pydantic models that validate it and describe it.

Each field of a model says three things in one place: its JSON type (``json_schema_input_type``,
what the JSON Schema and so the OpenAPI document and the page's editor show), its description,
and the rule that checks it (a function of ``asman.log.definition`` or ``asman.log.steps``
that raises :class:`~asman.errors.InvalidDefinition` or :class:`~asman.errors.InvalidPath`
with its one-line message naming the field). pydantic runs the rules in the order the fields
are declared, which is the order the checks have always run in, so the first fault reported
for a definition is the same as before. The models validate; they do not re-serialise: the
definition that is stored and hashed is the one given, with ``null`` values removed
(:func:`asman.log.definition.validate_definition`).

Why pydantic v2 and not msgspec (docs/architecture.md, "One schema source"): a rule may raise
its own exception, which pydantic lets through untouched, so every message stays the one line
it was; rules get a validation context (the limits, the path of a nested field); and
``model_json_schema`` writes JSON Schema 2020-12, the dialect of OpenAPI 3.1. msgspec decodes
faster but its errors are its own ("Expected `int`, got `str` - at `$.x`"), it has no
per-field validators, and the definition is validated from Python values, not JSON bytes, on
the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationInfo, model_validator

from asman.errors import InvalidDefinition, InvalidPath
from asman.log import definition as d
from asman.log import steps as s

__all__ = [
    "Build",
    "DataRefObject",
    "Definition",
    "OutputPath",
    "Requirements",
    "Step",
    "check_data_ref",
    "definition_json_schema",
    "validate_with_model",
]


@dataclass(slots=True)
class Context:
    """What the rules of one validation share: the limits, the definition being checked (nulls
    removed; checked values are written back into it), the prefix of a nested field's name,
    and the file tables that inputs and configFiles fill for the clash checks."""

    limits: d.DefinitionLimits
    out: dict[str, Any]
    prefix: str = ""
    names: dict[str, str] = field(default_factory=dict)
    absolute: dict[str, str] = field(default_factory=dict)
    refs: list[tuple[str, d.DataRef]] = field(default_factory=list)
    #: for a step: whether the job names an image (or a build) the step may run
    has_image: bool = False


def _check_object(
    model: type[BaseModel], value: Any, where: str, ctx: Context, has_image: bool = False
) -> dict[str, Any]:
    """``value`` (an object, nulls removed) checked by ``model``; ``where`` names it in
    messages. The rules that normalise a field (nulls removed) write it back (``_put``)."""
    obj = d._without_nulls(d._mapping(value, where))
    model.model_validate(obj, context=Context(ctx.limits, obj, f"{where}.", has_image=has_image))
    return obj


def _put(ctx: Context, name: str, value: Any) -> Any:
    """Write a checked, normalised field back into the object being checked."""
    ctx.out[name[len(ctx.prefix) :]] = value
    return value


Rule = Callable[[Any, Context, str], Any]


def _ctx(info: ValidationInfo) -> Context:
    ctx = info.context
    if not isinstance(ctx, Context):
        raise TypeError("validate a definition with asman.log.definition.validate_definition")
    return ctx


def rule(check: Rule, json_type: Any) -> PlainValidator:
    """A field checked by ``check(value, context, name)`` and shown as ``json_type``."""

    def run(value: Any, info: ValidationInfo) -> Any:
        ctx = info.context
        if ctx.__class__ is not Context:
            ctx = _ctx(info)
        name = info.field_name or ""
        return check(value, ctx, ctx.prefix + _ALIASES.get(name, name))

    return PlainValidator(run, json_schema_input_type=json_type)


_ALIASES = {
    "shm_size": "shmSize",
    "max_duration": "maxDuration",
    "config_files": "configFiles",
    "output_paths": "outputPaths",
    "ignore_error": "ignoreError",
    "build_context": "buildContext",
    "build_args": "buildArgs",
    "path_prefix": "pathPrefix",
}


def _doc(text: str, **schema: Any) -> Any:
    return Field(default=None, description=text, json_schema_extra=schema or None)


def _always(text: str, **schema: Any) -> Any:
    """A field whose rule runs even when it is absent (to say it is missing)."""
    return Field(
        default=None, description=text, json_schema_extra=schema or None, validate_default=True
    )


# -- rules of the top level --------------------------------------------------------------------


def _v(value: Any, ctx: Context, name: str) -> Any:
    if not d._is_int(value):
        raise InvalidDefinition(name, f"must be a whole number, got {d._show(value)}")
    return value


def _image(value: Any, ctx: Context, name: str) -> Any:
    out = ctx.out
    if "image" in out and "build" in out:
        raise InvalidDefinition("image", "set either 'image' or 'build', not both")
    if value is not None:
        image = d._str(value, name)
        if any(ch.isspace() for ch in image):
            raise InvalidDefinition(name, f"must not contain white space, got {d._show(image)}")
        return image
    steps: Any = out.get("steps")
    steps_have_images = d._is_list(steps) and all(
        isinstance(x, Mapping) and x.get("image") is not None for x in steps
    )
    if "build" not in out and not (steps and steps_have_images):
        raise InvalidDefinition(
            "image",
            "is missing: a job needs an 'image' to pull (such as \"alpine:3.20\") or a 'build' "
            "(a Dockerfile and/or a context URL)",
        )
    return None


def _argv(value: Any, ctx: Context, name: str) -> Any:
    d._validate_argv(value, name)
    return value


def _env(value: Any, ctx: Context, name: str) -> Any:
    return _put(ctx, name, d._validate_env(value, ctx.limits))


def _workdir(value: Any, ctx: Context, name: str) -> Any:
    workdir = d._str(value, name)
    if not workdir.startswith("/"):
        raise InvalidDefinition(name, f"must be an absolute path, got {d._show(workdir)}")
    return workdir


def _size(value: Any, ctx: Context, name: str) -> Any:
    d._check_size(value, name, ctx.limits)
    return value


def _duration(value: Any, ctx: Context, name: str) -> Any:
    d._check_duration(value, name, ctx.limits)
    return value


def _tags(value: Any, ctx: Context, name: str) -> Any:
    if not d._is_list(value):
        raise InvalidDefinition(name, f"must be a list of strings, got {d._show(value)}")
    for i, tag in enumerate(value):
        d._str(tag, f"{name}[{i}]")
    return value


def _nested(model: type[BaseModel]) -> Rule:
    """A rule that checks an object with ``model`` (nulls removed) and returns it."""

    def check(value: Any, ctx: Context, name: str) -> Any:
        return _put(ctx, name, _check_object(model, value, name, ctx))

    return check


def _count_files(ctx: Context) -> None:
    out = ctx.out
    count = sum(len(out[k]) for k in ("inputs", "configFiles") if isinstance(out.get(k), Mapping))
    if count > ctx.limits.max_files:
        raise InvalidDefinition(
            "inputs",
            f"inputs and configFiles hold {count} files, over the limit of {ctx.limits.max_files}",
        )


def _inputs(value: Any, ctx: Context, name: str) -> Any:
    _count_files(ctx)
    if value is None:
        return None
    refs, parsed = d._validate_refs(value, "inputs", ctx.names, ctx.absolute)
    ctx.refs += parsed
    return _put(ctx, name, refs)


def _config_files(value: Any, ctx: Context, name: str) -> Any:
    refs = None
    if value is not None:
        refs, parsed = d._validate_refs(value, "configFiles", ctx.names, ctx.absolute)
        ctx.refs += parsed
        _put(ctx, name, refs)
    d._check_no_clash(ctx.names)
    d._check_no_clash(ctx.absolute)
    return refs


def _volumes(value: Any, ctx: Context, name: str) -> Any:
    return _put(ctx, name, s._validate_volumes(value))  # the steps' rule reads it


def _output_paths(value: Any, ctx: Context, name: str) -> Any:
    if not d._is_list(value):
        raise InvalidDefinition(
            name, f'must be a list of {{"path": "/abs/path"}} objects, got {d._show(value)}'
        )
    if len(value) > s.MAX_OUTPUT_PATHS:
        raise InvalidDefinition(
            name, f"has {len(value)} entries, over the limit of {s.MAX_OUTPUT_PATHS}"
        )
    checked = [_check_object(OutputPath, x, f"{name}[{i}]", ctx) for i, x in enumerate(value)]
    return _put(ctx, name, checked)  # the steps' rule reads it


def _steps(value: Any, ctx: Context, name: str) -> Any:
    out = ctx.out
    if not d._is_list(value) or not value:
        raise InvalidDefinition(name, f"must be a non-empty list of steps, got {d._show(value)}")
    if len(value) > s.MAX_STEPS:
        raise InvalidDefinition(name, f"has {len(value)} steps, over the limit of {s.MAX_STEPS}")
    has_image = "image" in out or "build" in out
    checked = [_check_object(Step, x, f"{name}[{i}]", ctx, has_image) for i, x in enumerate(value)]
    writable = ["/outputs", *s.rw_folders(out)]
    readable = [*writable, "/inputs"]
    configs = out.get("configFiles") or {}
    readable += [n for n in configs if n.startswith("/")]
    for i, step in enumerate(checked):
        for key, folders, what in (
            ("stdin", readable, "/inputs, an absolute config file, /outputs or a volume"),
            ("stdout", writable, "/outputs, a volume or an output path's folder"),
            ("stderr", writable, "/outputs, a volume or an output path's folder"),
        ):
            path = step.get(key)
            if path is not None and not any(s._inside(path, f) for f in folders):
                raise InvalidDefinition(
                    f"{name}[{i}].{key}",
                    f"{path!r} is in no folder the steps share: put it under {what}",
                )
    return _put(ctx, name, checked)


# -- nested objects ----------------------------------------------------------------------------


class Build(BaseModel):
    """How to build the job's image (instead of pulling ``image``)."""

    model_config = ConfigDict(extra="allow", title="Build")

    context: Annotated[
        Any,
        rule(lambda v, c, n: d._str(v, n), str | None),
        _doc("A git or archive URL the image is built from"),
    ] = None
    target: Annotated[
        Any, rule(lambda v, c, n: d._str(v, n), str | None), _doc("The Dockerfile stage to build")
    ] = None
    dockerfile: Annotated[
        Any,
        rule(lambda v, c, n: d._str(v, n), str | None),
        _doc("The Dockerfile's text (instead of, or over, the context's)"),
    ] = None
    platform: Annotated[
        Any, rule(lambda v, c, n: d._str(v, n), str | None), _doc('Such as "linux/amd64"')
    ] = None
    build_context: Annotated[
        Any,
        rule(lambda v, c, n: _build_path(v, n, dot_ok=True), str | None),
        Field(default=None, alias="buildContext", description="Folder of the context to build in"),
    ] = None
    filename: Annotated[
        Any,
        rule(lambda v, c, n: _build_path(v, n), str | None),
        _doc("The Dockerfile's path in the context"),
    ] = None
    build_args: Annotated[
        Any,
        rule(lambda v, c, n: _build_args(v, n), list[str] | dict[str, str] | None),
        Field(
            default=None,
            alias="buildArgs",
            description='Build arguments: ["NAME=value", …] or {"NAME": "value"}',
        ),
    ] = None

    @model_validator(mode="after")
    def _needs_a_source(self, info: ValidationInfo) -> Build:
        ctx = _ctx(info)
        if "context" not in ctx.out and "dockerfile" not in ctx.out:
            raise InvalidDefinition(
                "build", "needs a 'context' (a git or archive URL) or a 'dockerfile' (its text)"
            )
        return self


def _build_path(value: Any, name: str, dot_ok: bool = False) -> Any:
    if dot_ok and value == ".":
        return value
    text = d._str(value, name)
    d.validate_relative_path(text.rstrip("/") if dot_ok else text, name)
    return value


def _build_args(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        for k, v in d._mapping(value, name).items():
            if not k or "=" in k:
                raise InvalidDefinition(
                    d._key(name, k), "a build argument name must not be empty or hold '='"
                )
            d._str(v, d._key(name, k), nonempty=False)
    elif d._is_list(value):
        for i, arg in enumerate(value):
            if not isinstance(arg, str) or arg.find("=") < 1:
                raise InvalidDefinition(
                    f"{name}[{i}]", f'must be a string "NAME=value", got {d._show(arg)}'
                )
    else:
        raise InvalidDefinition(
            name, f'must be a list of "NAME=value" strings or an object, got {d._show(value)}'
        )
    return value


def _cpus(value: Any, ctx: Context, name: str) -> Any:
    if not (d._is_number(value) and 0 < value <= ctx.limits.max_cpus):
        raise InvalidDefinition(
            name, f"must be a number > 0 and at most {ctx.limits.max_cpus}, got {d._show(value)}"
        )
    return value


def _gpus(value: Any, ctx: Context, name: str) -> Any:
    if not (d._is_int(value) and 0 <= value <= ctx.limits.max_gpus):
        raise InvalidDefinition(
            name, f"must be a whole number from 0 to {ctx.limits.max_gpus}, got {d._show(value)}"
        )
    return value


_SIZE_TYPE = int | str | None
_DURATION_TYPE = int | str | None
_LIMITS = d.DEFAULT_LIMITS
_ARGV = str | list[str] | None
# no ASCII white space: every JSON Schema regex dialect agrees on it, and the rule refuses it
_NO_SPACE = "^[^ \\t\\n\\r\\f\\v]+$"


class Requirements(BaseModel):
    """What the job needs of a worker."""

    model_config = ConfigDict(extra="allow", title="Requirements")

    cpus: Annotated[
        Any,
        rule(_cpus, float | None),
        _doc("CPUs (may be a fraction)", exclusiveMinimum=0, maximum=_LIMITS.max_cpus),
    ] = None
    gpus: Annotated[
        Any,
        rule(_gpus, int | None),
        _doc("GPUs, each the job's alone", minimum=0, maximum=_LIMITS.max_gpus),
    ] = None
    memory: Annotated[
        Any,
        rule(_size, _SIZE_TYPE),
        _doc('Memory: bytes, or "512m", "2g", "2GiB" (powers of 1024)'),
    ] = None
    max_duration: Annotated[
        Any,
        rule(_duration, _DURATION_TYPE),
        Field(
            default=None,
            alias="maxDuration",
            description='Longest run: seconds, or "30s", "20m", "1h30m" (at most 30 days)',
        ),
    ] = None


def _ref_type(value: Any, ctx: Context, name: str) -> Any:
    if value not in d.DATAREF_TYPES:
        raise InvalidDefinition(
            name, f"must be one of {', '.join(d.DATAREF_TYPES)}, got {d._show(value)}"
        )
    return value


def _ref_value(value: Any, ctx: Context, name: str) -> Any:
    if "value" not in ctx.out:
        raise InvalidDefinition(name, "is missing: a data reference needs a value")
    d._check_ref_value(ctx.out.get("type", "utf8"), value, name)
    return value


def _ref_hash(value: Any, ctx: Context, name: str) -> Any:
    if not (isinstance(value, str) and d._SHA256_HEX.fullmatch(value)):
        raise InvalidDefinition(name, f"must be 64 lower-case hex characters, got {d._show(value)}")
    return value


def _ref_size(value: Any, ctx: Context, name: str) -> Any:
    if not (d._is_int(value) and value >= 0):
        raise InvalidDefinition(name, f"must be a whole number ≥ 0, got {d._show(value)}")
    return value


class DataRefObject(BaseModel):
    """A file's content: inline (utf8, base64, json) or by reference (url, key, blob, s3).
    A plain string is a utf8 content, or a ``data:`` URL."""

    model_config = ConfigDict(
        extra="allow", title="DataRefObject", json_schema_extra={"required": ["value"]}
    )

    type: Annotated[Any, rule(_ref_type, Literal[d.DATAREF_TYPES] | None)] = Field(
        default=None, description="How value is read (default utf8)"
    )
    value: Annotated[Any, rule(_ref_value, Any)] = Field(
        default=None,
        validate_default=True,
        description="The text, base64, JSON value, http(s) URL, key, SHA-256 or s3:// URL",
    )
    hash: Annotated[Any, rule(_ref_hash, str | None)] = Field(
        default=None,
        description="SHA-256 of the content (a cache key, not part of the job id)",
        json_schema_extra={"pattern": "^[0-9a-f]{64}$"},
    )
    size: Annotated[Any, rule(_ref_size, int | None)] = Field(
        default=None, description="Bytes of the content", json_schema_extra={"minimum": 0}
    )


def check_data_ref(ref: dict[str, Any], where: str) -> None:
    """Check a data reference object (nulls removed); ``where`` names it in messages."""
    DataRefObject.model_validate(ref, context=Context(d.DEFAULT_LIMITS, ref, f"{where}."))


def _unknown_keys(ctx: Context, allowed: tuple[str, ...], says: str) -> None:
    unknown = set(ctx.out) - set(allowed)
    if unknown:
        raise InvalidDefinition(
            ctx.prefix[:-1], f"unknown keys {', '.join(sorted(unknown))}: {says}"
        )


def _text(value: Any, ctx: Context, name: str) -> Any:
    return d._str(value, name)


def _step_image(value: Any, ctx: Context, name: str) -> Any:
    if value is None:
        if not ctx.has_image:
            raise InvalidDefinition(
                name, "is missing: give each step an image, or the job an 'image' or a 'build'"
            )
        return None
    image = d._str(value, name)
    if any(ch.isspace() for ch in image):
        raise InvalidDefinition(name, f"must not contain white space: {image!r}")
    return image


def _step_env(value: Any, ctx: Context, name: str) -> Any:
    env = d._without_nulls(d._mapping(value, name))
    if len(env) > ctx.limits.max_env:
        raise InvalidDefinition(
            name, f"has {len(env)} variables, over the limit of {ctx.limits.max_env}"
        )
    for k, v in env.items():
        if not k or "=" in k or "\x00" in k:
            raise InvalidDefinition(
                f"{name}[{k!r}]", "a variable name must not be empty or hold '=' or NUL"
            )
        d._str(v, f"{name}[{k!r}]", nonempty=False)
    return _put(ctx, name, env)


def _step_workdir(value: Any, ctx: Context, name: str) -> Any:
    workdir = d._str(value, name)
    if not workdir.startswith("/"):
        raise InvalidDefinition(name, f"must be absolute, got {d._show(workdir)}")
    return workdir


def _redirect(value: Any, ctx: Context, name: str) -> Any:
    stdin = name.endswith(".stdin")
    return s._abs_path(value, name, outputs_ok=True, inputs_ok=stdin)


def _bool(value: Any, ctx: Context, name: str) -> Any:
    if not isinstance(value, bool):
        raise InvalidDefinition(name, "must be true or false")
    return value


class Step(BaseModel):
    """One container of a multi-step job (docs/guide.md, "Steps")."""

    # an unknown key is refused, unless null (null equals absent)
    model_config = ConfigDict(
        extra="forbid", title="Step", json_schema_extra={"additionalProperties": {"type": "null"}}
    )

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any, info: ValidationInfo) -> Any:
        keys = ", ".join(s.STEP_KEYS)
        _unknown_keys(_ctx(info), s.STEP_KEYS, f"a step has {keys}")
        return data

    name: Annotated[Any, rule(_text, str | None), _doc("Shown in logs")] = None
    image: Annotated[
        Any,
        rule(_step_image, str | None),
        _always("The step's image (else the job's)", minLength=1, pattern=_NO_SPACE),
    ] = None
    command: Annotated[Any, rule(_argv, _ARGV), _doc("A string or an argv")] = None
    entrypoint: Annotated[Any, rule(_argv, _ARGV), _doc("Overrides the image's")] = None
    env: Annotated[
        Any, rule(_step_env, dict[str, str | None] | None), _doc("Over the job's env")
    ] = None
    workdir: Annotated[Any, rule(_step_workdir, str | None), _doc("Absolute folder")] = None
    stdin: Annotated[
        Any, rule(_redirect, str | None), _doc("Absolute path of a file read as stdin")
    ] = None
    stdout: Annotated[
        Any, rule(_redirect, str | None), _doc("Absolute path stdout is written to")
    ] = None
    stderr: Annotated[
        Any, rule(_redirect, str | None), _doc("Absolute path stderr is written to")
    ] = None
    ignore_error: Annotated[Any, rule(_bool, bool | None)] = Field(
        default=None, alias="ignoreError", description="Go on when the step exits non-zero"
    )


def _output_path(value: Any, ctx: Context, name: str) -> Any:
    if value is None:
        raise InvalidDefinition(name, "is missing: give an absolute path")
    return s._abs_path(value, name, outputs_ok=True, wildcards=True)


def _output_type(value: Any, ctx: Context, name: str) -> Any:
    if value not in ("file", "directory"):
        raise InvalidDefinition(name, f'must be "file" or "directory", got {value!r}')
    return value


def _path_prefix(value: Any, ctx: Context, name: str) -> Any:
    path = ctx.out["path"]
    if s.has_wildcards(path):
        if value is None:
            raise InvalidDefinition(
                name, "is missing: a path with wildcards needs the prefix to cut from each match"
            )
        prefix = d._str(value, name)
        if not path.startswith(prefix):
            raise InvalidDefinition(name, f"{prefix!r} does not start the path {path!r}")
    elif value is not None:
        d._str(value, name)
    return value


def _s3_url(value: Any, ctx: Context, name: str) -> Any:
    return s._validate_url(value, name)


class OutputPath(BaseModel):
    """A file or folder collected from outside /outputs."""

    model_config = ConfigDict(
        extra="forbid",
        title="OutputPath",
        json_schema_extra={"required": ["path"], "additionalProperties": {"type": "null"}},
    )

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any, info: ValidationInfo) -> Any:
        _unknown_keys(_ctx(info), _OUTPUT_KEYS, "use path, type, pathPrefix, url")
        return data

    path: Annotated[Any, rule(_output_path, str)] = Field(
        default=None,
        validate_default=True,
        description="Absolute path; may hold wildcards (*, ?, [) with a pathPrefix",
    )
    type: Annotated[Any, rule(_output_type, Literal["file", "directory"] | None)] = Field(
        default=None, description="file (the default) or directory"
    )
    path_prefix: Annotated[Any, rule(_path_prefix, str | None)] = Field(
        default=None,
        alias="pathPrefix",
        validate_default=True,
        description="Cut from each match of a wildcard path",
    )
    url: Annotated[Any, rule(_s3_url, str | None)] = Field(
        default=None, description="s3://bucket/key the worker uploads it to"
    )

    @model_validator(mode="after")
    def _shared_folder(self, info: ValidationInfo) -> OutputPath:
        ctx = _ctx(info)
        folder = s.OutputPath.from_json(ctx.out).folder
        if folder in ("/", "/tmp"):
            raise InvalidPath(
                ctx.out["path"],
                f"lies in {folder}, a folder that cannot be shared by the steps (it would be "
                f"bound writable over the container's own): put it in a folder such as "
                f"/data (in {ctx.prefix}path)",
            )
        return self


_OUTPUT_KEYS = ("path", "type", "pathPrefix", "url")
_DATAREF = str | DataRefObject


class Definition(BaseModel):
    """A job definition in compute-queues' shape, with Asman's extensions."""

    model_config = ConfigDict(
        extra="allow",
        title="Definition",
        json_schema_extra={
            "description": "A job definition in compute-queues' shape: an image (or a build, "
            "or steps that each name one), command, env, inputs, configFiles, requirements, "
            "maxDuration. Unknown keys are kept and ignored; null equals absent.",
            "anyOf": [{"required": ["image"]}, {"required": ["build"]}, {"required": ["steps"]}],
        },
    )

    v: Annotated[Any, rule(_v, int | None), _doc("compute-queues' version tag")] = None
    image: Annotated[
        Any,
        rule(_image, str | None),
        _always('The image to pull, such as "alpine:3.20"', minLength=1, pattern=_NO_SPACE),
    ] = None
    build: Annotated[
        Any, rule(_nested(Build), Build | None), _doc("Build the image instead of pulling")
    ] = None
    command: Annotated[
        Any, rule(_argv, _ARGV), _doc("A shell-like string or an argv list (no shell runs)")
    ] = None
    entrypoint: Annotated[Any, rule(_argv, _ARGV), _doc("Overrides the image's")] = None
    env: Annotated[
        Any,
        rule(_env, dict[str, str | None] | None),
        _doc("Environment", maxProperties=_LIMITS.max_env),
    ] = None
    workdir: Annotated[Any, rule(_workdir, str | None), _doc("Absolute folder")] = None
    shm_size: Annotated[Any, rule(_size, _SIZE_TYPE)] = Field(
        default=None, alias="shmSize", description='Size of /dev/shm, such as "2g"'
    )
    max_duration: Annotated[Any, rule(_duration, _DURATION_TYPE)] = Field(
        default=None,
        alias="maxDuration",
        description='Longest run: seconds, or "30s", "20m", "1h30m" (at most 30 days)',
    )
    tags: Annotated[Any, rule(_tags, list[str] | None), _doc("Free labels")] = None
    requirements: Annotated[
        Any, rule(_nested(Requirements), Requirements | None), _doc("CPUs, GPUs, memory")
    ] = None
    inputs: Annotated[
        Any,
        rule(_inputs, dict[str, _DATAREF | None] | None),
        _always("Files under /inputs, by relative path"),
    ] = None
    config_files: Annotated[
        Any,
        rule(_config_files, dict[str, _DATAREF | None] | None),
        Field(
            default=None,
            alias="configFiles",
            validate_default=True,
            description="Files by relative path (under /inputs) or absolute container path",
        ),
    ] = None
    volumes: Annotated[
        Any,
        rule(_volumes, list[str] | None),
        _doc("Absolute folders shared, writable, by the steps", maxItems=s.MAX_VOLUMES),
    ] = None
    output_paths: Annotated[Any, rule(_output_paths, list[OutputPath] | None)] = Field(
        default=None,
        alias="outputPaths",
        description="Files collected from outside /outputs",
        json_schema_extra={"maxItems": s.MAX_OUTPUT_PATHS},
    )
    steps: Annotated[
        Any,
        rule(_steps, list[Step] | None),
        _doc("Containers run in order, in one job", minItems=1, maxItems=s.MAX_STEPS),
    ] = None

    @model_validator(mode="after")
    def _whole(self, info: ValidationInfo) -> Definition:
        ctx = _ctx(info)
        d._check_inline_and_size(ctx.out, ctx.refs, ctx.limits)
        return self


def validate_with_model(out: dict[str, Any], limits: d.DefinitionLimits) -> dict[str, Any]:
    """Check ``out`` (a definition with nulls removed) in place with :class:`Definition`."""
    Definition.model_validate(out, context=Context(limits, out))
    return out


@cache
def definition_json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of a job definition, with the default limits."""
    schema = Definition.model_json_schema(ref_template="#/$defs/{model}")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
