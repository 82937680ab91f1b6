#!/usr/bin/env python3
"""Pin the overlays' images to the digests the release process just pushed.

Every overlay in docker/k8s/overlays/ names its images by digest (`images:` entries with `digest: sha256:…`); in the
repository they hold a placeholder, and a release fills them after pushing:

    docker push registry.example.com/warmfleet/warmfleet:0.2.0
    docker push registry.example.com/warmfleet/warmfleet-gpu:0.2.0
    python3 docker/release/pin-images.py --from-docker \\
        warmfleet=registry.example.com/warmfleet/warmfleet:0.2.0 \\
        warmfleet-gpu=registry.example.com/warmfleet/warmfleet-gpu:0.2.0 \\
        redis=docker.io/library/redis:7.4

`NAME=REPOSITORY@sha256:<64 hex>` pins a digest you already have (from `docker buildx imagetools inspect`, crane, or
your registry); with `--from-docker`, `NAME=REFERENCE` is looked up in the local Docker's RepoDigests (an image that
was pushed or pulled). NAME is the image's name in the manifests (warmfleet, warmfleet-gpu, redis). Every image of
every overlay must be pinned at once, or nothing is written; `--check` exits 1 while a placeholder or a tag is left.
Only the `newName:` and `digest:` lines of each entry change, so the files' comments stay. Needs only Python 3.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

OVERLAYS = Path(__file__).resolve().parent.parent / "k8s" / "overlays"
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
PINNED = re.compile(r"^(?P<repo>[a-z0-9][a-z0-9._/:-]*?)@(?P<digest>sha256:[0-9a-f]{64})$")


class PinError(Exception):
    pass


def image_entries(text: str) -> dict[str, dict[str, str]]:
    """The `images:` entries of a kustomization: name → {newName, digest, newTag} as written."""
    entries: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    in_images = False
    for line in text.splitlines():
        if re.match(r"^images:\s*$", line):
            in_images = True
            continue
        if in_images and re.match(r"^\S", line):
            in_images = False
        if not in_images:
            continue
        m = re.match(r"^\s*-\s+name:\s*(\S+)\s*$", line)
        if m:
            current = entries.setdefault(m.group(1).strip("\"'"), {})
            continue
        m = re.match(r"^\s+(newName|digest|newTag):\s*(\S+)\s*$", line)
        if m and current is not None:
            current[m.group(1)] = m.group(2).strip("\"'")
    return entries


def rewrite(text: str, pins: dict[str, tuple[str, str]]) -> str:
    """Set newName and digest of each pinned entry (and drop its newTag); every other line is kept."""
    out: list[str] = []
    name: str | None = None
    in_images = False
    for line in text.splitlines(keepends=True):
        if re.match(r"^images:\s*$", line):
            in_images = True
        elif in_images and re.match(r"^\S", line):
            in_images, name = False, None
        m = re.match(r"^(\s*)-\s+name:\s*(\S+)\s*$", line) if in_images else None
        if m:
            name = m.group(2).strip("\"'")
            out.append(line)
            if name in pins:
                indent = m.group(1) + "  "
                repo, digest = pins[name]
                out.append(f"{indent}newName: {repo}\n{indent}digest: {digest}\n")
            continue
        if in_images and name in pins and re.match(r"^\s+(newName|digest|newTag):", line):
            continue
        out.append(line)
    return "".join(out)


def docker_digest(reference: str) -> tuple[str, str]:
    """(repository, digest) of a local image pushed to or pulled from its registry."""
    try:
        out = subprocess.run(["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", reference],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise PinError(f"docker cannot inspect {reference}: {getattr(exc, 'stderr', '') or exc}".strip()) from exc
    repo = reference.rsplit("@", 1)[0]
    repo = repo if ":" not in repo.rsplit("/", 1)[-1] else repo.rsplit(":", 1)[0]
    for candidate in json.loads(out) or []:
        m = PINNED.match(candidate)
        if m and m.group("repo") == repo:
            return repo, m.group("digest")
    raise PinError(f"{reference} has no digest from {repo} in the local Docker: push or pull it first")


def parse_pins(args: list[str], from_docker: bool) -> dict[str, tuple[str, str]]:
    pins: dict[str, tuple[str, str]] = {}
    for arg in args:
        name, sep, ref = arg.partition("=")
        if not sep or not name or not ref:
            raise PinError(f"{arg!r}: write NAME=REPOSITORY@sha256:<digest> (or NAME=REFERENCE with --from-docker)")
        m = PINNED.match(ref)
        if m:
            pins[name] = (m.group("repo"), m.group("digest"))
        elif from_docker:
            pins[name] = docker_digest(ref)
        else:
            raise PinError(f"{arg!r}: not REPOSITORY@sha256:<64 hex digits> (a tag needs --from-docker)")
    return pins


def unpinned(overlays: Path = OVERLAYS) -> list[str]:
    """`overlay: image` for every image entry without a real digest."""
    problems = []
    for path in sorted(overlays.glob("*/kustomization.yaml")):
        for name, entry in image_entries(path.read_text()).items():
            if not DIGEST.match(entry.get("digest", "")) or "newTag" in entry:
                problems.append(f"{path.parent.name}: {name} ({entry.get('digest') or entry.get('newTag')})")
    return problems


def pin(pins: dict[str, tuple[str, str]], overlays: Path = OVERLAYS) -> list[Path]:
    paths = sorted(overlays.glob("*/kustomization.yaml"))
    texts = {p: p.read_text() for p in paths}
    named = {name for text in texts.values() for name in image_entries(text)}
    missing, unknown = sorted(named - set(pins)), sorted(set(pins) - named)
    if missing or unknown:
        raise PinError("pin every image of the overlays at once: "
                       + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                 unknown and f"no overlay names {', '.join(unknown)}"])))
    changed = []
    for path, text in texts.items():
        new = rewrite(text, pins)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="*", metavar="NAME=REF")
    parser.add_argument("--from-docker", action="store_true", help="look tags up in the local Docker's RepoDigests")
    parser.add_argument("--check", action="store_true", help="exit 1 while an overlay's image is not pinned")
    parser.add_argument("--overlays", type=Path, default=OVERLAYS)
    args = parser.parse_args(argv)
    try:
        if args.check:
            left = unpinned(args.overlays)
            for line in left:
                print(f"not pinned: {line}", file=sys.stderr)
            return 1 if left else 0
        for path in pin(parse_pins(args.images, args.from_docker), args.overlays):
            print(f"pinned {path}")
    except PinError as exc:
        print(f"pin-images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
