"""The one strict pattern for every name that becomes a path, a Redis key or a queue name."""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
"""Lower-case ASCII letters, digits, '.', '_' and '-'; starts and ends alphanumeric; at most 64."""

COMPONENT_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
"""Components (base, lora, vae) carry no '-' so that `component-version` splits unambiguously."""


class InvalidName(ValueError):
    """A model, component, version or release name that could escape a folder or a queue."""


def _has_dotdot(value: str) -> bool:
    return ".." in value


def validate_name(value: str, kind: str = "name") -> str:
    """Return `value` unchanged if it is a safe name, else raise InvalidName saying what is allowed."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or _has_dotdot(value):
        raise InvalidName(
            f"invalid {kind} {value!r}: use 1-64 lower-case ASCII letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit, with no '..'"
        )
    return value


def validate_component(value: str) -> str:
    if not isinstance(value, str) or not COMPONENT_PATTERN.fullmatch(value):
        raise InvalidName(
            f"invalid component {value!r}: use a lower-case letter then letters, digits or '_' (no '-'), e.g. base, lora, vae"
        )
    return value


def validate_relpath(value: str) -> str:
    """A file path inside a version folder: relative, no '..', no backslashes, each part a plain name."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\\" in value or "\x00" in value:
        raise InvalidName(f"invalid file path {value!r}: must be a relative POSIX path inside its version folder")
    parts = value.split("/")
    for part in parts:
        if part in ("", ".", "..") or not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", part):
            raise InvalidName(f"invalid file path {value!r}: part {part!r} is not a plain file or folder name")
    return value


@dataclass(frozen=True, order=True)
class ComponentRef:
    """One version of one component of a model: the unit stored in L3 and L2."""

    model: str
    component: str
    version: str

    def __post_init__(self) -> None:
        validate_name(self.model, "model")
        validate_component(self.component)
        validate_name(self.version, "version")

    @property
    def key(self) -> str:
        return f"{self.model}/{self.component}/{self.version}"

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class Release:
    """A named combination a worker serves: `model@base-v1.0.0+lora-v2.3.1`.

    The base comes first; other components follow in the order given. The string form is canonical:
    parsing then formatting gives the same string, so it can be a dict key, a Redis field and a queue suffix.
    """

    model: str
    components: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        validate_name(self.model, "model")
        if not self.components:
            raise InvalidName(f"release of {self.model!r} names no component; expected e.g. {self.model}@base-v1.0.0")
        seen = set()
        for component, version in self.components:
            validate_component(component)
            validate_name(version, "version")
            if component in seen:
                raise InvalidName(f"release names component {component!r} twice")
            seen.add(component)
        if self.components[0][0] != "base":
            raise InvalidName(f"release {self} must start with its base component, e.g. {self.model}@base-v1.0.0")

    @classmethod
    def parse(cls, text: str) -> Release:
        if not isinstance(text, str) or text.count("@") != 1:
            raise InvalidName(f"invalid release {text!r}: expected model@base-<version>[+lora-<version>]")
        model, rest = text.split("@")
        components = []
        for part in rest.split("+"):
            component, sep, version = part.partition("-")
            if not sep:
                raise InvalidName(f"invalid release {text!r}: {part!r} is not component-version")
            components.append((component, version))
        return cls(model, tuple(components))

    def __str__(self) -> str:
        return self.model + "@" + "+".join(f"{c}-{v}" for c, v in self.components)

    def version_of(self, component: str) -> str | None:
        return dict(self.components).get(component)

    def refs(self) -> list[ComponentRef]:
        return [ComponentRef(self.model, c, v) for c, v in self.components]

    @property
    def base(self) -> ComponentRef:
        return self.refs()[0]

    @property
    def queue(self) -> str:
        return queue_for(self)


QUEUE_PREFIX = "release."


def queue_for(release: Release | str) -> str:
    """The Celery queue of a release. The one place a queue name is derived."""
    if isinstance(release, str):
        release = Release.parse(release)
    return QUEUE_PREFIX + str(release)


NODE_QUEUE_PREFIX = "node."


def node_queue(node: str) -> str:
    """The queue a node's maintenance worker consumes, so beat's sync reaches every node's own disk."""
    return NODE_QUEUE_PREFIX + validate_name(node, "node")


def release_of_queue(queue: str) -> Release | None:
    if not queue.startswith(QUEUE_PREFIX):
        return None
    return Release.parse(queue[len(QUEUE_PREFIX) :])


def version_sort_key(version: str) -> tuple:
    """Natural order: v1.10.0 after v1.9.0; digits compare as numbers, text as text."""
    return tuple((0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.findall(r"\d+|[^\d.]+", version))
