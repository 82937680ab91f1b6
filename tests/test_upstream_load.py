"""A worker loads through diffusers' and peft's public APIs only, and a single-file checkpoint is converted once, at
publish, by diffusers itself.

- The builder's pipeline is what any diffusers user gets for the same L2 folders (`from_pretrained`, one
  `load_lora_weights` per LoRA, `set_adapters`): the same tensors and, for a seed, the same image bytes.
- A single file published today is a diffusers folder in L2 whose manifest keeps the file's name and sha256; the
  worker reads that folder and never the checkpoint; its images are those of a bare `from_single_file` of the file.
- A version published the old way (the raw file and config/ in L2) still serves, through a plain `from_single_file`.
- Nothing in the worker's code imports a private name of torch/diffusers/peft/transformers/accelerate or assigns
  to a library's attributes, and a build leaves every library class and function as it found it.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
import torch

from cachemgr import Cache, LocalArchive, Release
from cachemgr.manifest import sha256_file
from cachemgr.names import ComponentRef
from cachemgr.sync import sync_release
from fleetctl.demo.builders import (
    DEMO_MODEL,
    SHARED_BASE_RELEASES,
    SINGLE_FILE_CHECKPOINT,
    SINGLE_FILE_DEMO_MODEL,
    SINGLE_FILE_DEMO_RELEASE,
    build_sdxl,
    build_single_file,
)
from tasks.requests import GenerateRequest
from workers.models import SingleFile, StableDiffusionXL, builder_for, family_of
from workers.models.base import LORA_WEIGHT_NAME, adapter_name

REPO = Path(__file__).resolve().parent.parent
PREVIOUS, CURRENT = SHARED_BASE_RELEASES
LIBRARIES = ("torch", "diffusers", "peft", "transformers", "accelerate", "safetensors")
PUBLIC_UNDERSCORED = {"_exit", "_replace", "_asdict", "_fields", "_make"}
"""os._exit and namedtuple's methods: public API spelled with a leading underscore."""
PROMPT, SEED = "Leather Jacket", 5


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Same thread count on both sides: what makes image bytes comparable."""


@pytest.fixture(scope="module")
def cache(demo_archive_dir, tmp_path_factory) -> Cache:
    cache = Cache.at(tmp_path_factory.mktemp("l2"))
    for text in (*SHARED_BASE_RELEASES, SINGLE_FILE_DEMO_RELEASE):
        sync_release(LocalArchive(demo_archive_dir), cache.store, Release.parse(text))
    return cache


def png(pipe, seed: int = SEED, steps: int = 4) -> bytes:
    """One 64×64 image as a worker makes it (guidance 5.0, the demo's), PNG-encoded."""
    out = pipe(prompt=PROMPT, negative_prompt=None, num_inference_steps=steps, guidance_scale=5.0, width=64, height=64,
               generator=torch.Generator("cpu").manual_seed(seed))
    buf = io.BytesIO()
    out.images[0].save(buf, format="PNG")
    return buf.getvalue()


def worker_png(resident, release: str | None = None) -> bytes:
    return resident.generate(GenerateRequest(prompt=PROMPT, seed=SEED), release)[0]


def plain_sdxl(cache: Cache):
    """What any diffusers user gets for the same folders: `from_pretrained`, then one `load_lora_weights` per LoRA."""
    from diffusers import StableDiffusionXLPipeline

    base = Release.parse(PREVIOUS).base
    pipe = StableDiffusionXLPipeline.from_pretrained(str(cache.store.path(base)), local_files_only=True,
                                                     use_safetensors=True)
    for text in SHARED_BASE_RELEASES:
        lora = Release.parse(text).refs()[1]
        pipe.load_lora_weights(str(cache.store.path(lora)), weight_name=LORA_WEIGHT_NAME,
                               adapter_name=adapter_name(lora.version), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_builder_holds_what_plain_diffusers_holds_and_draws_the_same_images(cache):
    ours = StableDiffusionXL.builder(DEMO_MODEL, PREVIOUS).also_serving(CURRENT).with_cache(cache).on("cpu").build()
    theirs = plain_sdxl(cache)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours.pipeline, name).state_dict(), getattr(theirs, name).state_dict()
        assert list(a) == list(b), name
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), name
    assert ours.pipeline.get_list_adapters() == theirs.get_list_adapters()
    for release in (PREVIOUS, CURRENT, PREVIOUS):  # switched back and forth: diffusers' own set_adapters each time
        theirs.set_adapters([adapter_name(Release.parse(release).version_of("lora"))])
        assert worker_png(ours, release) == png(theirs), release
    assert ours.pipeline.get_active_adapters() == theirs.get_active_adapters()


def test_a_published_single_file_is_a_diffusers_folder_in_l2_and_boot_never_reads_a_checkpoint(cache):
    release = Release.parse(SINGLE_FILE_DEMO_RELEASE)
    manifest = cache.store.manifest(release.base)
    origin = manifest.meta["converted_from"]
    assert manifest.meta["layout"] == "single-file" and origin["file"] == SINGLE_FILE_CHECKPOINT
    assert origin["layout"] == "single-file" and len(origin["sha256"]) == 64 and origin["size"] > 0
    root = cache.store.path(release.base)
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= files
    assert not any(f.endswith(".safetensors") and "/" not in f for f in files) and not any(
        f.startswith("config/") for f in files)

    # the L2 holds no checkpoint to convert, and nothing else is given: the pipeline is the folder's, from_pretrained
    resident = builder_for(family_of(cache.store, release)).builder(release.model, release).with_cache(cache).on(
        "cpu").build()
    assert resident.family == SingleFile.family and resident.pipeline.name_or_path == str(root)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """An SD single file (fp32) and an SDXL one in fp16, as a trainer ships them, with their config folders."""
    from diffusers import StableDiffusionXLPipeline

    from fleetctl.demo import formats

    w = tmp_path_factory.mktemp("files")
    sd = build_single_file(w / "sd", seed=5000)  # the demo's own file: the shared archive published this one
    xl = build_sdxl(w / "xl", 4800)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl, local_files_only=True, use_safetensors=True)
    ckpt = formats.save_sdxl_original_checkpoint(pipe, w / "xl-file" / "48.safetensors", torch.float16)
    return {"sd": sd, "xl": ckpt, "xl_config": formats.copy_without_weights(xl, w / "xl-config")}


def test_the_manifest_keeps_the_original_s_sha256(cache, studio):
    """The shared archive's single-file version was published from the very file the demo builds (same seed)."""
    origin = cache.store.manifest(Release.parse(SINGLE_FILE_DEMO_RELEASE).base).meta["converted_from"]
    original = studio["sd"] / SINGLE_FILE_CHECKPOINT
    assert origin["sha256"] == sha256_file(original) and origin["size"] == original.stat().st_size


def _bare(path: Path, config: Path, dtype=torch.float32):
    from workers.models.single_file import pipeline_class

    pipe = pipeline_class(config).from_single_file(str(path), config=str(config), local_files_only=True, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_converted_sd_file_draws_what_bare_from_single_file_draws(cache, studio):
    resident = SingleFile.builder(SINGLE_FILE_DEMO_MODEL, SINGLE_FILE_DEMO_RELEASE).with_cache(
        cache).on("cpu").build()
    bare = _bare(studio["sd"] / SINGLE_FILE_CHECKPOINT, studio["sd"] / "config")
    assert worker_png(resident) == png(bare)


def test_an_fp16_sdxl_file_is_stored_in_fp16_and_serves_in_fp32_as_bare_diffusers_does(studio, tmp_path):
    """SDXL's open-CLIP encoder is split and renamed by the conversion: converted at publish in the file's fp16,
    then cast up by the fp32 worker, it must equal a bare fp32 `from_single_file` of the file."""
    from click.testing import CliRunner

    from fleetctl.cli import main

    home = tmp_path / "home"
    done = CliRunner().invoke(main, ["publish", "xl", "base", "v1", str(studio["xl"]), "--config",
                                     str(studio["xl_config"]), "--meta", "default_steps=4", "--meta",
                                     "default_guidance=5.0", "--meta", "default_width=64", "--meta",
                                     "default_height=64"],
                              env={"FLEET_HOME": str(home), "FLEET_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert done.exit_code == 0, done.output
    assert "converted from 48.safetensors" in done.output
    archive = LocalArchive(home / "archive")
    meta = archive.read_manifest(ComponentRef("xl", "base", "v1")).meta
    assert meta["family"] == "sdxl" and meta["converted_from"]["precision"] == "fp16"
    assert meta["converted_from"]["sha256"] == sha256_file(studio["xl"])
    assert set(meta["precision"].values()) == {"fp16"} and "48.safetensors" not in meta["precision"]
    listed = CliRunner().invoke(main, ["versions", "xl"], env={"FLEET_HOME": str(home),
                                                              "FLEET_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert listed.exit_code == 0, listed.output
    assert f"converted from 48.safetensors (sha256 {meta['converted_from']['sha256'][:12]}…)" in listed.output
    cache = Cache.at(tmp_path / "l2")
    resident = SingleFile.builder("xl", "xl@base-v1").with_archive(archive).with_cache(cache).on("cpu").build()
    assert resident.pipeline.unet.dtype == torch.float32
    assert worker_png(resident) == png(_bare(studio["xl"], studio["xl_config"]))


def test_a_version_published_the_old_way_still_serves_through_from_single_file(studio, tmp_path):
    """Archives hold single-file versions published before conversion at publish: the raw file and config/."""
    archive = LocalArchive(tmp_path / "archive")
    ref = ComponentRef("old", "base", "v1")
    archive.publish(ref, studio["sd"], meta={"family": "sd", "layout": "single-file", "checkpoint":
                                             SINGLE_FILE_CHECKPOINT, "default_steps": 4, "default_guidance": 5.0,
                                             "default_width": 64, "default_height": 64})
    cache = Cache.at(tmp_path / "l2")
    release = Release.parse("old@base-v1")
    sync_release(archive, cache.store, release)
    assert (cache.store.path(ref) / SINGLE_FILE_CHECKPOINT).is_file()
    resident = builder_for(family_of(cache.store, release)).builder("old", release).with_cache(cache).on("cpu").build()
    assert worker_png(resident) == png(_bare(studio["sd"] / SINGLE_FILE_CHECKPOINT, studio["sd"] / "config"))


def test_a_build_replaces_no_library_class_or_function(cache):
    """Every attribute of torch's Module, of diffusers' single-file conversion module and of peft's LoRA layer is
    the same object after a build (with a LoRA) and a single-file build as before."""
    import diffusers.loaders.single_file_utils as single_file_utils
    import peft.tuners.lora as lora
    from diffusers import StableDiffusionXLPipeline

    watched = [torch.nn.Module, single_file_utils, lora.LoraModel, lora.LoraLayer, StableDiffusionXLPipeline]
    before = [dict(vars(obj)) for obj in watched]
    StableDiffusionXL.builder(DEMO_MODEL, CURRENT).with_cache(cache).on("cpu").build()
    SingleFile.builder(SINGLE_FILE_DEMO_MODEL, SINGLE_FILE_DEMO_RELEASE).with_cache(cache).on(
        "cpu").build()
    for obj, was in zip(watched, before, strict=True):
        now = vars(obj)
        changed = sorted(k for k in set(was) | set(now) if was.get(k) is not now.get(k))
        assert changed == [], (obj, changed)


def _library(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in LIBRARIES


def _own(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _violations(path: Path) -> list[str]:
    """In one file: imports of a library's private names, assignments to attributes of library modules or classes,
    any use of another object's private attribute (`x._name`, not `self._name`), and setattr calls."""
    tree = ast.parse(path.read_text())
    aliases: set[str] = set()  # names bound to a library module or one of its objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _library(node.module):
            for alias in node.names:
                aliases.add(alias.asname or alias.name)
                if alias.name.startswith("_") or any(part.startswith("_") for part in node.module.split(".")):
                    found.append(f"{path}:{node.lineno} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _library(alias.name):
                    aliases.add((alias.asname or alias.name).split(".")[0])
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(f"{path}:{node.lineno} imports {alias.name}")
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AugAssign | ast.AnnAssign) else []
        for target in targets:
            root = target
            while isinstance(root, ast.Attribute | ast.Subscript):
                root = root.value
            if isinstance(target, ast.Attribute | ast.Subscript) and isinstance(root, ast.Name) and root.id in aliases:
                found.append(f"{path}:{node.lineno} assigns to {ast.unparse(target)}")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not (
                node.attr.startswith("__") and node.attr.endswith("__")) and not _own(node.value) and \
                node.attr not in PUBLIC_UNDERSCORED:
            found.append(f"{path}:{node.lineno} uses a private attribute: {ast.unparse(node)}")
        if isinstance(node, ast.Attribute) and node.attr == "__setattr__" or isinstance(node, ast.Call) and \
                isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            found.append(f"{path}:{node.lineno} sets attributes by name: {ast.unparse(node)}")
    return found


def test_the_worker_code_uses_no_private_library_name_and_patches_nothing():
    files = sorted(p for part in ("workers", "fleetctl") for p in (REPO / part).rglob("*.py"))
    assert not (REPO / "workers" / "models" / "mapped.py").exists()
    found = [v for path in files for v in _violations(path)]
    assert found == [], "\n".join(found)
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "workers" / "models").glob("*.py")}
    assert max(sizes.values()) <= 400, sizes
