"""Every model family is built the same way — `Family.builder(model, release).with_cache(Cache.at(path)).build()` —
from the cache it is given, the settings' default, or FLEET_CACHE_ROOT, and touches nothing else.

The isolation checks run in a fresh interpreter (`python -m tests.test_models`) whose HOME, HF_HOME and
XDG_CACHE_HOME point into a temp folder: hub libraries read those at import time, so a monkeypatch in this
process could not catch a write there. The child records every file Python opens while it builds and
generates, and every file that changes under the temp folder, and the tests below judge its report.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachemgr import Cache, LocalArchive, Release
from cachemgr.sync import sync_release
from fleetctl.demo.builders import (
    DEMO_RELEASES,
    SD_DEMO_RELEASE,
    SINGLE_FILE_DEMO_RELEASE,
    WUERSTCHEN_DEMO_RELEASE,
)
from workers.models import (
    FAMILIES,
    LoadError,
    SingleFile,
    StableDiffusion,
    StableDiffusionXL,
    Wuerstchen,
    builder_for,
    family_of,
)

REPO = Path(__file__).resolve().parent.parent
RELEASES = {
    "sd": SD_DEMO_RELEASE,
    "sdxl": DEMO_RELEASES[1],
    "wuerstchen": WUERSTCHEN_DEMO_RELEASE,
    "single-file": SINGLE_FILE_DEMO_RELEASE,
}
MODES = ("with_cache", "settings_default", "environment")
PROMPT, SEED = "Leather Jacket", 11


# -- the child: one fresh interpreter builds every family in every mode ------------------------------------
def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and link under root with its size and mtime: what a write would change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path)] = (st.st_size if not path.is_dir() else 0, st.st_mtime_ns if not path.is_dir() else 0)
    return out


def _mode_env(mode: str, root: Path, family: str) -> tuple[dict[str, str], Path]:
    """FLEET_ variables for a mode, and the cache the build must then use."""
    if mode == "with_cache":
        return {}, root / "given" / family
    if mode == "settings_default":
        home = root / "fleet-home" / family
        return {"FLEET_HOME": str(home)}, home / "l2"
    cache = root / "env-cache" / family
    return {"FLEET_HOME": str(root / "fleet-home-ignored" / family), "FLEET_CACHE_ROOT": str(cache)}, cache


def _in_real_home(path: str) -> bool:
    """Under the user's real home, other than this checkout and its interpreter (which may live there)."""
    home = os.environ["REAL_HOME"] + "/"
    mine = (str(REPO) + "/", sys.prefix + "/", sys.base_prefix + "/")
    return path.startswith(home) and not path.startswith(mine)


def run_child(archive_dir: Path, root: Path, report: Path) -> None:
    """Sync each release into its mode's cache (L3 → L2, not part of the build), then build and generate with
    nothing but that cache, recording what was opened and what changed."""
    import torch

    from tasks.requests import GenerateRequest

    torch.set_num_threads(1)
    archive = LocalArchive(archive_dir)
    opened: list[str] = []
    recording = [False]

    def audit(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path = os.fsdecode(args[0])
            if path not in sys.path:  # the import system probing a sys.path entry (an editable install's hook)
                opened.append(os.path.abspath(path))

    sys.addaudithook(audit)
    results = []
    for family, text in RELEASES.items():
        release = Release.parse(text)
        for mode in MODES:
            env, cache_root = _mode_env(mode, root, family)
            for key in [k for k in os.environ if k.startswith("FLEET_")]:
                del os.environ[key]
            os.environ.update(env)
            sync_release(archive, Cache.at(cache_root).store, release)
            before = _tree(root)
            # as the worker boot does: the family comes from the base manifest's meta
            builder = builder_for(family_of(Cache.at(cache_root).store, release)).builder(release.model, release)
            if mode == "with_cache":
                builder = builder.with_cache(Cache.at(cache_root))
            opened.clear()
            recording[0] = True
            resident = builder.on("cpu").build()
            png, params, _ = resident.generate(GenerateRequest(prompt=PROMPT, seed=SEED))
            recording[0] = False
            after = _tree(root)
            changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
            from PIL import Image

            image = Image.open(io.BytesIO(png))
            pixels = list(image.convert("L").getdata())
            results.append({
                "family": family, "mode": mode, "cache": str(cache_root), "sha256": hashlib.sha256(png).hexdigest(),
                "size": list(image.size), "distinct_pixels": len(set(pixels)), "params": params,
                "changed": changed, "opened_under_root": sorted({p for p in opened if p.startswith(str(root))}),
                "opened_under_real_home": sorted({p for p in opened if _in_real_home(p)}),
                "resident_family": resident.family,
            })
    report.write_text(json.dumps(results, indent=1))


# -- the parent: start the child with hub caches and HOME redirected --------------------------------------
@pytest.fixture(scope="module")
def isolated(demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("isolated")
    for name in ("home", "hf", "xdg", "work"):
        (root / name).mkdir()
    report = tmp_path_factory.mktemp("report") / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "HF_", "XDG_", "TRANSFORMERS_"))}
    env.update({
        "HOME": str(root / "home"), "HF_HOME": str(root / "hf"), "XDG_CACHE_HOME": str(root / "xdg"),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "REAL_HOME": str(Path.home()),
        "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1",
    })
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_models", "--archive", str(demo_archive_dir), "--root", str(root),
         "--report", str(report)],
        cwd=root / "work", env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    runs = {(r["family"], r["mode"]): r for r in json.loads(report.read_text())}
    return {"root": root, "runs": runs}


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(RELEASES))
def test_each_family_builds_from_its_cache_and_generates(isolated, family, mode):
    run = isolated["runs"][(family, mode)]
    assert run["resident_family"] == family
    assert run["size"] == [64, 64]
    assert run["distinct_pixels"] > 16, "a flat image: the pipeline produced nothing"
    assert run["params"]["seed"] == SEED


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(RELEASES))
def test_nothing_outside_the_given_cache_is_read_or_written(isolated, family, mode):
    run = isolated["runs"][(family, mode)]
    cache = run["cache"] + "/"
    assert any("/snapshots/" in p for p in run["opened_under_root"]), "no snapshot file was read from the cache"
    assert [p for p in run["opened_under_root"] if not p.startswith(cache)] == []
    assert [p for p in run["changed"] if not (p + "/").startswith(cache)] == []
    assert run["opened_under_real_home"] == []


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
def test_hub_caches_and_home_stay_empty(isolated):
    root = isolated["root"]
    for name in ("hf", "xdg", "home", "work"):
        assert list((root / name).rglob("*")) == [], f"{name} was written to"


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
def test_same_release_and_seed_give_the_same_bytes_whatever_the_cache(isolated):
    runs = isolated["runs"]
    for family in RELEASES:
        assert len({runs[(family, mode)]["sha256"] for mode in MODES}) == 1, family
    assert len({runs[(family, "with_cache")]["sha256"] for family in RELEASES}) == len(RELEASES)


# -- in-process: the builder API and its refusals --------------------------------------------------------
def test_omitting_with_cache_uses_the_settings_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("FLEET_CACHE_ROOT", raising=False)
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    assert StableDiffusionXL.builder("nano-banana")._resolved_cache() == Cache.at(tmp_path / "home" / "l2")
    monkeypatch.setenv("FLEET_CACHE_ROOT", str(tmp_path / "nvme"))
    assert Wuerstchen.builder("tiny-wuerstchen")._resolved_cache() == Cache.at(tmp_path / "nvme")
    given = Cache.at(tmp_path / "given")
    assert SingleFile.builder("pixel-single").with_cache(given)._resolved_cache() == given


def test_every_family_has_the_same_builder_shape():
    assert set(FAMILIES) == {"sd", "sd2", "sdxl", "wuerstchen", "single-file"}
    for family, cls in FAMILIES.items():
        builder = cls.builder("m", "m@base-v1.0.0").with_cache(Cache.at("/tmp/x")).on("cpu", "float32")
        assert builder.family == family and builder_for(family) is cls
        assert (builder.device, builder.dtype, str(builder.release)) == ("cpu", "float32", "m@base-v1.0.0")


def test_a_base_of_another_family_is_refused(demo_archive_dir, tmp_path):
    cache = Cache.at(tmp_path / "l2")
    archive = LocalArchive(demo_archive_dir)
    builder = StableDiffusion.builder("nano-banana", DEMO_RELEASES[1]).with_cache(cache).with_archive(archive)
    with pytest.raises(LoadError, match="is a 'sdxl' model, not 'sd'"):
        builder.build()
    assert family_of(cache.store, Release.parse(DEMO_RELEASES[1])) == "sdxl"


def test_wuerstchen_refuses_a_lora_before_touching_disk(tmp_path):
    builder = Wuerstchen.builder("tiny-wuerstchen", "tiny-wuerstchen@base-v1.0.0+lora-v1.0.0")
    with pytest.raises(LoadError, match="does not load LoRA adapters"):
        builder.with_cache(Cache.at(tmp_path / "l2")).build()
    assert not (tmp_path / "l2").exists()


def test_an_unknown_component_is_refused_not_ignored(tmp_path):
    builder = StableDiffusion.builder("pixel-sd", "pixel-sd@base-v1.0.0+controlnet-v1.0.0").with_cache(Cache.at(tmp_path))
    with pytest.raises(LoadError, match="component 'controlnet' is not supported"):
        builder.build()


def test_unknown_family_names_the_supported_ones():
    with pytest.raises(LoadError, match="supported: sd, sd2, sdxl, single-file, wuerstchen"):
        builder_for("kandinsky")


def test_a_single_file_base_needs_exactly_one_checkpoint(tmp_path):
    from workers.models.single_file import checkpoint_file

    with pytest.raises(LoadError, match="holds 0 top-level"):
        checkpoint_file(tmp_path, {})
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "b.safetensors").write_bytes(b"x")
    with pytest.raises(LoadError, match="holds 2 top-level"):
        checkpoint_file(tmp_path, {})
    assert checkpoint_file(tmp_path, {"checkpoint": "b.safetensors"}) == tmp_path / "b.safetensors"
    with pytest.raises(LoadError, match="not a top-level"):
        checkpoint_file(tmp_path, {"checkpoint": "../b.safetensors"})


def test_the_single_file_export_is_exact(tmp_path):
    """The original-layout checkpoint the demo writes loads back, through diffusers' own converter, to the very
    weights it came from: the same seed gives the same pixels as the diffusers folder."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from fleetctl.demo.builders import build_sd, build_single_file

    build_sd(tmp_path / "folder", seed=77)
    build_single_file(tmp_path / "single", seed=77)
    folder = StableDiffusionPipeline.from_pretrained(tmp_path / "folder", local_files_only=True, use_safetensors=True)
    single = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "single" / "48.safetensors"), config=str(tmp_path / "single" / "config"), local_files_only=True
    )
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part

    def image(pipe):
        out = pipe("x", num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(1))
        return np.asarray(out.images[0], dtype=np.int16)

    assert np.abs(image(folder) - image(single)).max() == 0


def main() -> None:
    parser = argparse.ArgumentParser(description="child of test_models: build every family in every cache mode")
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    run_child(args.archive, args.root, args.report)


if __name__ == "__main__":
    main()
