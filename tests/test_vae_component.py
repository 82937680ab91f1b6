"""A VAE published like a LoRA (an fp16-safe SDXL VAE, say) and named by a release: `…@base-v1.1.0+vae-v1.0.0`.

The user publishes a diffusers AutoencoderKL folder as component `vae`; publish checks it before anything is
uploaded; a release that names it decodes with it, and one that does not is unchanged."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cachemgr import Cache, ComponentRef, LocalArchive, Release
from cachemgr.sync import sync_release
from fleetctl.demo.builders import DEMO_MODEL
from tasks.requests import GenerateRequest
from workers.models import LoadError, StableDiffusionXL

BASE = f"{DEMO_MODEL}@base-v1.1.0"
WITH_VAE = f"{DEMO_MODEL}@base-v1.1.0+vae-v1.0.0"
VAE_REF = ComponentRef(DEMO_MODEL, "vae", "v1.0.0")


def publish(archive: LocalArchive, home: Path, *args: str):  # noqa: ANN201 - click's Result
    from click.testing import CliRunner

    from fleetctl.cli import main

    return CliRunner().invoke(main, ["publish", *args], env={"FLEET_HOME": str(home),
                                                              "FLEET_ARCHIVE_URL": archive.root.as_uri()})


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The same torch thread count for both builds, so their images are comparable byte for byte."""


@pytest.fixture(scope="module")
def archive(demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LocalArchive:
    import shutil

    root = tmp_path_factory.mktemp("archive") / "l3"
    shutil.copytree(demo_archive_dir, root)
    return LocalArchive(root)


@pytest.fixture(scope="module")
def vae_folder(archive: LocalArchive, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base's own VAE with its decoder output scaled: a VAE that visibly decodes differently."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(archive.root / DEMO_MODEL / "base" / "v1.1.0" / "vae", local_files_only=True)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
        vae.decoder.conv_out.bias.add_(0.3)
    out = tmp_path_factory.mktemp("studio") / "sdxl-vae-fp16-fix"
    vae.save_pretrained(out, safe_serialization=True)
    (out / "README.md").write_text("an fp16-safe VAE\n")
    return out


@pytest.fixture(scope="module")
def published(archive: LocalArchive, vae_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    done = publish(archive, tmp_path_factory.mktemp("home"), DEMO_MODEL, "vae", "v1.0.0", str(vae_folder))
    assert done.exit_code == 0, done.output
    return done.output


@pytest.fixture(scope="module")
def cache(archive: LocalArchive, published: str, tmp_path_factory: pytest.TempPathFactory) -> Cache:
    cache = Cache.at(tmp_path_factory.mktemp("l2"))
    for text in (BASE, WITH_VAE):
        sync_release(archive, cache.store, Release.parse(text))
    return cache


def image(cache: Cache, release: str, seed: int = 7) -> np.ndarray:
    resident = StableDiffusionXL.builder(DEMO_MODEL, release).with_cache(cache).on("cpu").build()
    png, _, _ = resident.generate(GenerateRequest(prompt="Leather Jacket", seed=seed), release)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_a_vae_folder_publishes_as_a_component_and_its_clutter_is_skipped(archive, published):
    manifest = archive.read_manifest(VAE_REF)
    assert manifest.meta["family"] == "vae" and manifest.meta["layout"] == "vae"
    assert sorted(f.path for f in manifest.files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert "skipped 1: README.md" in published


def test_a_release_naming_the_vae_decodes_with_it_and_one_that_does_not_is_unchanged(cache, vae_folder):
    from diffusers import AutoencoderKL

    resident = StableDiffusionXL.builder(DEMO_MODEL, WITH_VAE).with_cache(cache).on("cpu").build()
    published = AutoencoderKL.from_pretrained(vae_folder, local_files_only=True)
    assert torch.equal(resident.pipeline.vae.decoder.conv_out.weight, published.decoder.conv_out.weight)

    plain, plain_again, decoded = image(cache, BASE), image(cache, BASE), image(cache, WITH_VAE)
    assert np.array_equal(plain, plain_again)
    assert np.abs(decoded - plain).mean() > 5  # the same latents, decoded by another VAE


def test_bad_vae_folders_are_refused_at_publish_with_one_line_and_nothing_uploaded(archive, vae_folder, tmp_path):
    import json
    import shutil

    not_a_vae = tmp_path / "unet"
    shutil.copytree(archive.root / DEMO_MODEL / "base" / "v1.1.0" / "unet", not_a_vae)
    pickled = tmp_path / "pickled"
    shutil.copytree(vae_folder, pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded, ever")
    wrong = tmp_path / "wrong"
    shutil.copytree(vae_folder, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["latent_channels"] = 8
    (wrong / "config.json").write_text(json.dumps(config))
    cases = {
        not_a_vae: "not AutoencoderKL",
        pickled: "is a pickle",
        wrong: "does not fit its config.json",
        vae_folder / "diffusion_pytorch_model.safetensors": "is not a folder",
    }
    for version, (folder, expected) in enumerate(cases.items(), start=2):
        done = publish(archive, tmp_path / "home", DEMO_MODEL, "vae", f"v{version}.0.0", str(folder))
        assert done.exit_code == 1, done.output
        assert expected in done.output and len(done.output.strip().splitlines()) == 1, done.output
        assert not archive.has_version(ComponentRef(DEMO_MODEL, "vae", f"v{version}.0.0"))
    other = publish(archive, tmp_path / "home", DEMO_MODEL, "controlnet", "v1.0.0", str(vae_folder))
    assert other.exit_code == 1 and "publish base, lora or vae" in other.output


def test_a_family_without_a_replaceable_vae_refuses_the_release_before_loading(cache):
    from workers.models import Wuerstchen

    with pytest.raises(LoadError, match="takes no published VAE"):
        Wuerstchen.builder("tiny-wuerstchen", "tiny-wuerstchen@base-v1.0.0+vae-v1.0.0").with_cache(cache).build()
