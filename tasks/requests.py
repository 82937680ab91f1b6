"""The parameters of one generation, validated at the boundary: a bad job fails alone, clearly."""

from __future__ import annotations

import hashlib
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from cachemgr.names import InvalidName, Release, validate_name

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 150
MIN_SIDE, MAX_SIDE = 8, 2048
MAX_PIXELS = 2048 * 2048
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 50.0


class BadRequest(ValueError):
    """A job whose parameters can never succeed; it is not retried."""


def _clean_text(value: Any, field: str, allow_empty: bool) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{field} is not valid UTF-8") from None
    if not isinstance(value, str):
        raise ValueError(f"{field} must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} contains characters that are not valid UTF-8 (lone surrogates)") from None
    if "\x00" in value:
        raise ValueError(f"{field} contains a NUL character")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{field} has {len(value)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    if not allow_empty and not value.strip():
        raise ValueError(f"{field} is empty")
    return value


class GenerateRequest(BaseModel):
    """What a producer may ask for. Unset values take the release's defaults on the worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    release: str | None = None
    model: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> str:
        return _clean_text(v, "prompt", allow_empty=False)

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _negative(cls, v: Any) -> str | None:
        return None if v is None else _clean_text(v, "negative_prompt", allow_empty=True)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, v: Any) -> int | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("steps must be a whole number")
        if not 1 <= v <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {v}")
        return v

    @field_validator("guidance", mode="before")
    @classmethod
    def _guidance(cls, v: Any) -> float | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError("guidance must be a number")
        if not math.isfinite(v):
            raise ValueError(f"guidance must be finite, got {v}")
        if not 0.0 <= v <= MAX_GUIDANCE:
            raise ValueError(f"guidance must be between 0 and {MAX_GUIDANCE}, got {v}")
        return float(v)

    @field_validator("width", "height", mode="before")
    @classmethod
    def _side(cls, v: Any, info: Any) -> int | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{info.field_name} must be a whole number of pixels")
        if not MIN_SIDE <= v <= MAX_SIDE or v % 8:
            raise ValueError(f"{info.field_name} must be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE}, got {v}")
        return v

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, v: Any) -> int | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SEED:
            raise ValueError(f"seed must be a whole number between 0 and {MAX_SEED}, got {v!r}")
        return v

    @field_validator("release", mode="before")
    @classmethod
    def _release(cls, v: Any) -> str | None:
        if v is None:
            return None
        try:
            return str(Release.parse(v))
        except InvalidName as exc:
            raise ValueError(str(exc)) from None

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> str | None:
        if v is None:
            return None
        try:
            return validate_name(v, "model")
        except InvalidName as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _consistent(self) -> GenerateRequest:
        if self.width and self.height and self.width * self.height > MAX_PIXELS:
            raise ValueError(f"{self.width}x{self.height} is more than {MAX_PIXELS} pixels")
        if self.release and self.model and Release.parse(self.release).model != self.model:
            raise ValueError(f"release {self.release} is not a release of model {self.model}")
        return self

    @property
    def target_model(self) -> str | None:
        return Release.parse(self.release).model if self.release else self.model

    @classmethod
    def parse(cls, **params: Any) -> GenerateRequest:
        """Validate, turning pydantic's report into one readable BadRequest."""
        try:
            return cls(**params)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise BadRequest(f"bad generate request: {problems}") from None
        except TypeError as exc:
            raise BadRequest(f"bad generate request: {exc}") from None


PARAMETERS: tuple[str, ...] = tuple(GenerateRequest.model_fields)
"""`generate`'s parameters in positional order: the request model's field order, declared nowhere else."""


def params_of_call(args: Any = (), kwargs: Any = None) -> dict[str, Any]:
    """A call's positional and named arguments as one dict of named parameters (positional order: PARAMETERS)."""
    args = tuple(args or ())
    if len(args) > len(PARAMETERS):
        raise BadRequest(f"bad generate request: too many positional arguments ({len(args)})")
    if not isinstance(kwargs or {}, dict):
        raise BadRequest("bad generate request: named arguments must be a mapping")
    params = dict(zip(PARAMETERS, args, strict=False))
    for name, value in (kwargs or {}).items():
        if name in params:
            raise BadRequest(f"bad generate request: {name} given twice")
        params[name] = value
    return params


def is_pinned(args: Any, kwargs: Any) -> bool:
    """A job that named its release must be served by that release and nothing else (queue moves leave it)."""
    try:
        return bool(params_of_call(args, kwargs).get("release"))
    except BadRequest:
        return bool((kwargs or {}).get("release")) if isinstance(kwargs, dict) else False


def repinned(args: Any, kwargs: Any, release: str) -> tuple[list[Any], dict[str, Any]]:
    """The same job pinned to `release` instead (an operator's `move-queued --include-pinned`): every parameter as a
    named one, the release replaced, a `model` that names another model dropped."""
    try:
        params = params_of_call(args, kwargs)
    except BadRequest:
        params = dict(kwargs or {})
    params["release"] = str(Release.parse(release))
    if params.get("model") and params["model"] != Release.parse(release).model:
        params.pop("model")
    return [], params


def stable_seed(request: GenerateRequest, task_id: str) -> GenerateRequest:
    """A job without a seed gets one derived from its task id, so a redelivered job makes the same image."""
    if request.seed is not None:
        return request
    return request.model_copy(update={"seed": int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big")})


def request_of_job(task_id: str, args: Any, kwargs: Any) -> GenerateRequest:
    """The GenerateRequest a received job carries, with its stable seed: one reading for the task body and batching."""
    return stable_seed(GenerateRequest.parse(**params_of_call(args, kwargs)), task_id)
