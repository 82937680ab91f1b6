"""Version manifests: every file of a version with its size and sha256, and for safetensors files the
byte range and hash of every tensor, read from the header (no tensor is loaded to find them)."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .names import ComponentRef, InvalidName, validate_relpath

MANIFEST_NAME = "manifest.json"
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt")
"""Only safetensors and plain-text configs travel through the tiers: nothing that is unpickled."""

HASH_CHUNK = 1 << 20
PIECE_SIZE = 1 << 20
"""Non-safetensors files are cut into fixed pieces of this size for differential sync."""


class ManifestError(ValueError):
    """A manifest that is malformed, lies about its files, or points outside its version folder."""


def _frozen(cls: type, **fields: Any) -> Any:
    """An instance of a frozen dataclass with these fields, without its generated `__init__` (one
    `object.__setattr__` per field: most of the time a large manifest takes to parse, ~2,000 tensor ranges and
    pieces for an SDXL release)."""
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


@dataclass(frozen=True)
class TensorRange:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int  # exclusive
    sha256: str


@dataclass(frozen=True)
class Piece:
    """A byte range of a file with its own hash: the unit a differential sync reuses or fetches."""

    start: int
    end: int
    sha256: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    tensors: tuple[TensorRange, ...] = ()
    pieces: tuple[Piece, ...] = ()
    """Cover the file end to end: the safetensors header, each tensor (and any padding), or fixed chunks."""

    @property
    def is_safetensors(self) -> bool:
        return self.path.endswith(".safetensors")


@dataclass(frozen=True)
class Manifest:
    model: str
    component: str
    version: str
    files: tuple[FileEntry, ...]
    created_at: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> ComponentRef:
        return ComponentRef(self.model, self.component, self.version)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def subset(self, keep: set[str]) -> Manifest:
        """The same version with only the files a node needs (e.g. one precision of a model published in two)."""
        from dataclasses import replace

        omitted = sorted({f.path for f in self.files} - keep) + list(self.meta.get("omitted", ()))
        return replace(self, files=tuple(f for f in self.files if f.path in keep),
                       meta={**self.meta, "subset_of": len(self.files) + len(self.meta.get("omitted", ())),
                             "omitted": sorted(omitted)})

    @property
    def version_paths(self) -> list[str]:
        """Every file of the published version, those a subset left out (meta "omitted") included."""
        return [f.path for f in self.files] + list(self.meta.get("omitted", ()))

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def to_json(self) -> str:
        """The manifest's JSON: the text it was parsed from, unchanged, or a fresh rendering of a built one.
        (Re-rendering a large parsed manifest costs tens of milliseconds on every commit to L2.)"""
        source = self.__dict__.get("_source")
        if source is not None:
            return source
        data = asdict(self)
        data["format"] = 1
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
            files = tuple(
                FileEntry(
                    path=f["path"],
                    size=int(f["size"]),
                    sha256=str(f["sha256"]),
                    tensors=tuple(
                        _frozen(TensorRange, name=str(t["name"]), dtype=str(t["dtype"]),
                                shape=tuple(map(int, t["shape"])), start=int(t["start"]), end=int(t["end"]),
                                sha256=str(t["sha256"]))
                        for t in f.get("tensors", ())
                    ),
                    pieces=tuple(
                        _frozen(Piece, start=int(p["start"]), end=int(p["end"]), sha256=str(p["sha256"]))
                        for p in f.get("pieces", ())
                    ),
                )
                for f in data["files"]
            )
            manifest = cls(
                model=data["model"],
                component=data["component"],
                version=data["version"],
                files=files,
                created_at=float(data.get("created_at", 0.0)),
                meta=dict(data.get("meta") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc
        manifest.validate()
        object.__setattr__(manifest, "_source", text if isinstance(text, str) else text.decode())
        return manifest

    def validate(self) -> None:
        """Reject anything that could escape the version folder, load a pickle, or lie about sizes."""
        try:
            ComponentRef(self.model, self.component, self.version)
        except InvalidName as exc:
            raise ManifestError(str(exc)) from exc
        seen: set[str] = set()
        for entry in self.files:
            try:
                validate_relpath(entry.path)
            except InvalidName as exc:
                raise ManifestError(str(exc)) from exc
            if entry.path == MANIFEST_NAME:
                raise ManifestError(f"{self.ref}: a file may not be named {MANIFEST_NAME}")
            if not entry.path.endswith(ALLOWED_SUFFIXES):
                raise ManifestError(
                    f"{self.ref}: file {entry.path!r} is not allowed; only {', '.join(ALLOWED_SUFFIXES)} "
                    "files are stored (no pickled weights)"
                )
            if entry.path in seen:
                raise ManifestError(f"{self.ref}: file {entry.path!r} listed twice")
            seen.add(entry.path)
            if entry.size < 0 or len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256):
                raise ManifestError(f"{self.ref}: file {entry.path!r} has a bad size or sha256")
            for t in entry.tensors:
                if not (0 <= t.start <= t.end <= entry.size):
                    raise ManifestError(f"{self.ref}: tensor {t.name!r} of {entry.path!r} lies outside the file")
            if entry.pieces:
                position = 0
                for piece in entry.pieces:
                    if piece.start != position or piece.end < piece.start or len(piece.sha256) != 64:
                        raise ManifestError(f"{self.ref}: pieces of {entry.path!r} do not tile the file")
                    position = piece.end
                if position != entry.size:
                    raise ManifestError(f"{self.ref}: pieces of {entry.path!r} cover {position} of {entry.size} bytes")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data offset, header dict). The header is JSON after an 8-byte little-endian length."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ManifestError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * (1 << 20):
            raise ManifestError(f"{path}: safetensors header of {length} bytes is implausible")
        header = json.loads(fh.read(length))
    return 8 + length, header


def _header_ranges(path: Path) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, dtype, shape, start, end) of every tensor, in file order, from the header alone."""
    offset, header = read_safetensors_header(path)
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out.append((name, info["dtype"], tuple(info["shape"]), offset + begin, offset + end))
    out.sort(key=lambda r: (r[3], r[4]))
    return out


@dataclass(frozen=True)
class FileDescription:
    size: int
    sha256: str
    tensors: tuple[TensorRange, ...]
    pieces: tuple[Piece, ...]


def describe_file(path: Path, chunk: int = HASH_CHUNK) -> FileDescription:
    """Size, whole-file sha256, per-tensor and per-piece hashes of one file in a single sequential read, `chunk`
    bytes at a time: a multi-GB checkpoint is read once and never held (nor any tensor of it) in memory.

    Pieces are cut at tensor boundaries for safetensors (so an updated tensor is one piece), fixed chunks
    otherwise."""
    size = path.stat().st_size
    ranges = _header_ranges(path) if path.name.endswith(".safetensors") else []
    if ranges:
        cuts = sorted({0, size, *(r[3] for r in ranges), *(r[4] for r in ranges)})
    else:
        cuts = sorted({*range(0, size, PIECE_SIZE), size})
    whole = hashlib.sha256()
    pieces = []
    with open(path, "rb") as fh:
        for start, end in zip(cuts, cuts[1:], strict=False):
            if end <= start:
                continue
            piece = hashlib.sha256()
            remaining = end - start
            while remaining:
                data = fh.read(min(chunk, remaining))
                if not data:
                    raise ManifestError(f"{path}: file shrank while it was being described")
                piece.update(data)
                whole.update(data)
                remaining -= len(data)
            pieces.append(Piece(start, end, piece.hexdigest()))
        if fh.read(1):
            raise ManifestError(f"{path}: file grew while it was being described")
    by_range = {(p.start, p.end): p.sha256 for p in pieces}
    empty = hashlib.sha256(b"").hexdigest()
    tensors = tuple(TensorRange(name, dtype, shape, start, end, by_range.get((start, end), empty))
                    for name, dtype, shape, start, end in ranges)
    if any(t.end > t.start and (t.start, t.end) not in by_range for t in tensors):
        raise ManifestError(f"{path}: tensors overlap in the safetensors header")
    return FileDescription(size, whole.hexdigest(), tensors, tuple(pieces))


def tensor_ranges(path: Path) -> tuple[TensorRange, ...]:
    return describe_file(path).tensors


def build_manifest(ref: ComponentRef, source: Path, meta: dict[str, Any] | None = None) -> Manifest:
    """Describe every file under `source`; refuses files that would not be allowed to load."""
    files = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source).as_posix()
        if rel == MANIFEST_NAME:
            continue
        if not rel.endswith(ALLOWED_SUFFIXES):  # refused before a byte of it is read
            raise ManifestError(f"{ref}: file {rel!r} is not allowed; only {', '.join(ALLOWED_SUFFIXES)} "
                                "files are stored (no pickled weights)")
        d = describe_file(path)
        files.append(FileEntry(rel, d.size, d.sha256, d.tensors, d.pieces))
    manifest = Manifest(ref.model, ref.component, ref.version, tuple(files), time.time(), dict(meta or {}))
    manifest.validate()
    return manifest
