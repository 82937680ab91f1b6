"""Real model files: the checkpoints and LoRAs a design studio has publish through the CLI and serve from real
workers, offline; what would not boot is refused at publish with one line and nothing uploaded.

One fleet for the module: a private redis-server, an archive under the fleet's home, the files built once (tiny
configs, seeded random weights), then workers started together and shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cachemgr import Cache, LocalArchive
from cachemgr.names import ComponentRef
from fleetctl.demo import formats
from fleetctl.demo.builders import build_sd, build_sdxl
from tasks.settings import FleetSettings

from .support import image_data, start_worker, wait_warm

pytestmark = pytest.mark.integration
SMALL = ["--meta", "default_steps=2", "--meta", "default_width=64", "--meta", "default_height=64"]
R = {  # release → what it shows
    "kohya": "studio@base-v48+lora-v20",
    "twin": "studio@base-v48+lora-v21",
    "peft": "pixel@base-v1+lora-v1",
    "fp16only": "half@base-v1",
    "mixed": "mixed@base-v1",
    "hub": "hub@base-v1",
}


def cli(settings: FleetSettings, *args: str):  # noqa: ANN201
    from click.testing import CliRunner

    from fleetctl.cli import main

    return CliRunner().invoke(main, list(args), env={"FLEET_HOME": str(settings.home),
                                                     "FLEET_BROKER_URL": settings.broker_url})


def publish(settings: FleetSettings, *args: str) -> str:
    done = cli(settings, "publish", *args)
    assert done.exit_code == 0, done.output
    return done.output


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> dict[str, Path]:
    """What a studio has, built once: an SDXL single file in SGM layout (fp16), a kohya LoRA named 20.safetensors
    with UNet and both text-encoder keys and its diffusers twin, an SD 1.x single file and a PEFT folder,
    diffusers folders with fp16 only, fp32 + fp16, and one straight from the hub with its clutter."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from workers.models.original_layout import save_original_checkpoint

    w = tmp_path_factory.mktemp("studio")
    xl = build_sdxl(w / "xl", 4800)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl, local_files_only=True, use_safetensors=True)
    out = {"xl_ckpt": formats.save_sdxl_original_checkpoint(pipe, w / "downloads" / "48.safetensors", torch.float16),
           "xl_config": formats.copy_without_weights(xl, w / "xl-config")}
    lora = formats.build_full_lora(xl, "sdxl", 2000)
    out["kohya"] = formats.save_kohya_lora(lora, w / "downloads" / "20.safetensors")
    out["twin"] = formats.save_diffusers_lora(lora, "sdxl", w / "twin")
    sd = build_sd(w / "sd", 100)
    sd_pipe = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True, use_safetensors=True)
    out["sd_ckpt"] = save_original_checkpoint(sd_pipe, w / "downloads" / "pixel.safetensors")
    out["sd_config"] = formats.copy_without_weights(sd, w / "sd-config")
    sd_lora = formats.build_full_lora(sd, "sd", 101)
    out["peft"] = formats.save_peft_folder(sd_lora, w / "peft")
    out["sd_kohya"] = formats.save_kohya_lora(sd_lora, w / "downloads" / "sd-style.safetensors")
    out["fp16only"] = formats.save_fp16_variant(build_sd(w / "half", 200), keep_fp32=False)
    out["mixed"] = formats.save_fp16_variant(build_sd(w / "mixed", 300), keep_fp32=True)
    out["hub"] = formats.add_hub_clutter(build_sd(w / "hub", 400))
    bad = w / "bad"
    bad.mkdir()
    (bad / "model.ckpt").write_bytes(b"\x80\x04pickle")
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(4, 4)}, str(bad / "unknown.safetensors"))
    data = out["sd_ckpt"].read_bytes()
    (bad / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    out["bad"] = bad
    return out


@pytest.fixture(scope="module")
def studio(redis_server, files, tmp_path_factory: pytest.TempPathFactory):
    """Everything published through the CLI, then one worker per base (fp32), and a second node serving the
    fp32+fp16 model in fp16; shared by the module."""
    import tasks

    home = tmp_path_factory.mktemp("home")
    settings = FleetSettings(home=home, broker_url=redis_server.url, torch_threads=1, heartbeat_seconds=1.0,
                             warm_ttl_seconds=4.0, route_cache_ttl=0.0, node_name="node-a")
    outputs = {}
    outputs["xl"] = publish(settings, "studio", "base", "v48", str(files["xl_ckpt"]), "--config", str(files["xl_config"]),
                            "--family", "sdxl", *SMALL)
    outputs["kohya"] = publish(settings, "studio", "lora", "v20", str(files["kohya"]))
    publish(settings, "studio", "lora", "v21", str(files["twin"]))
    publish(settings, "pixel", "base", "v1", str(files["sd_ckpt"]), "--config", str(files["sd_config"]), *SMALL)
    outputs["peft"] = publish(settings, "pixel", "lora", "v1", str(files["peft"]))
    outputs["fp16only"] = publish(settings, "half", "base", "v1", str(files["fp16only"]), *SMALL)
    outputs["mixed"] = publish(settings, "mixed", "base", "v1", str(files["mixed"]), *SMALL)
    outputs["hub"] = publish(settings, "hub", "base", "v1", str(files["hub"]), *SMALL)
    logs = home / "logs"
    workers = [start_worker(settings, [R["kohya"], R["twin"]], "w-studio", logs, wait=False),
               start_worker(settings, [R["peft"]], "w-pixel", logs, wait=False),
               start_worker(settings, [R["fp16only"], ], "w-half", logs, wait=False),
               start_worker(settings, [R["hub"]], "w-hub", logs, wait=False)]
    half_node = settings.model_copy(update={"node_name": "node-b", "cache_root": home / "node-b-cache",
                                            "dtype": "float16"})
    workers.append(start_worker(half_node, [R["mixed"]], "w-mixed16", logs, wait=False))
    try:
        for w, s in zip(workers, [settings] * 4 + [half_node], strict=True):
            wait_warm(s, w, timeout=300)
        tasks.configure(settings)
        yield {"settings": settings, "half_node": half_node, "outputs": outputs, "tasks": tasks}
    finally:
        for w in workers:
            w.stop()
        tasks.app.pool.force_close_all()


def generate(studio, release: str, seed: int = 7) -> dict:
    return studio["tasks"].generate.delay("a leather jacket", release=release, seed=seed).get(timeout=120)


def image_bytes(result: dict) -> bytes:
    from urllib.parse import urlparse

    return Path(urlparse(result["image_uri"]).path).read_bytes()


def archive_of(settings: FleetSettings) -> LocalArchive:
    return LocalArchive(settings.home / "archive")


def test_an_sdxl_single_file_given_directly_is_detected_and_serves_offline(studio):
    manifest = archive_of(studio["settings"]).read_manifest(ComponentRef("studio", "base", "v48"))
    assert manifest.meta["family"] == "sdxl" and manifest.meta["layout"] == "single-file"
    origin = manifest.meta["converted_from"]
    assert origin["file"] == "48.safetensors" and origin["precision"] == "fp16" and origin["dtype"] == "float16"
    assert "family sdxl" in studio["outputs"]["xl"] and "converted from 48.safetensors" in studio["outputs"]["xl"]
    result = generate(studio, R["kohya"])
    assert result["release"] == R["kohya"] and result["width"] == 64 and image_bytes(result)[:4] == b"\x89PNG"


def test_the_single_file_is_published_converted_keeping_its_sha256_and_the_worker_s_l2_is_a_folder(studio, files):
    """Converted once at publish: the archive and the worker's L2 hold a diffusers folder (fp16, as the file was),
    never the checkpoint, so a worker has nothing to convert at boot; the manifest names the file and its sha256."""
    from cachemgr.manifest import sha256_file

    ref = ComponentRef("studio", "base", "v48")
    manifest = archive_of(studio["settings"]).read_manifest(ref)
    assert manifest.meta["converted_from"]["sha256"] == sha256_file(files["xl_ckpt"])
    assert manifest.meta["converted_from"]["size"] == files["xl_ckpt"].stat().st_size
    paths = {f.path for f in manifest.files}
    assert "48.safetensors" not in paths and not any(p.startswith("config/") for p in paths)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"} <= paths
    assert set(manifest.meta["precision"].values()) == {"fp16"}
    root = Cache.at(studio["settings"].resolved_cache_root).store.path(ref)  # where w-studio loaded it from
    held = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert held == paths


def test_the_kohya_release_draws_what_bare_diffusers_draws_from_the_original_file(studio, files):
    """The worker (converted folder, from_pretrained, two adapters, set_adapters) against a diffusers user's
    `from_single_file` of the original fp16 file in float32 + `load_lora_weights` of the kohya file: same bytes."""
    import io

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(files["xl_ckpt"]), config=str(files["xl_config"]),
                                                      local_files_only=True, dtype=torch.float32)
    pipe.load_lora_weights(str(files["kohya"].parent), weight_name=files["kohya"].name, adapter_name="style")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a leather jacket", negative_prompt=None, num_inference_steps=2, guidance_scale=7.5, width=64,
               height=64, generator=torch.Generator("cpu").manual_seed(11))
    buf = io.BytesIO()
    out.images[0].save(buf, format="PNG")
    assert image_data(image_bytes(generate(studio, R["kohya"], seed=11))) == buf.getvalue()


def test_a_kohya_lora_named_by_its_trainer_and_its_diffusers_twin_give_the_same_image(studio):
    manifest = archive_of(studio["settings"]).read_manifest(ComponentRef("studio", "lora", "v20"))
    assert manifest.meta["weight_name"] == "20.safetensors" and manifest.meta["lora_format"] == "kohya"
    assert manifest.meta["lora_parts"] == ["te1", "te2", "unet"] and manifest.meta["family"] == "sdxl"
    kohya, twin = generate(studio, R["kohya"], seed=11), generate(studio, R["twin"], seed=11)
    assert image_data(image_bytes(kohya)) == image_data(image_bytes(twin))


def test_an_sd_single_file_and_a_peft_folder_serve(studio):
    meta = archive_of(studio["settings"]).read_manifest(ComponentRef("pixel", "lora", "v1")).meta
    assert meta["lora_format"] == "peft" and meta["family"] == "sd"
    assert "README.md" in studio["outputs"]["peft"]  # skipped and listed
    assert generate(studio, R["peft"])["release"] == R["peft"]


def test_a_diffusers_folder_with_only_fp16_files_serves_on_an_fp32_worker(studio):
    meta = archive_of(studio["settings"]).read_manifest(ComponentRef("half", "base", "v1")).meta
    assert meta["variants"] == ["fp16"] and meta["plain_weights"] is False
    assert generate(studio, R["fp16only"])["release"] == R["fp16only"]


def test_an_fp16_node_fetches_only_the_fp16_files_of_a_model_published_in_both(studio):
    manifest = archive_of(studio["settings"]).read_manifest(ComponentRef("mixed", "base", "v1"))
    fp16 = [f for f in manifest.files if ".fp16." in f.path]
    fp32 = [f for f in manifest.files if f.path.endswith(".safetensors") and ".fp16." not in f.path]
    assert fp16 and fp32 and all(manifest.meta["precision"][f.path] == "fp16" for f in fp16)
    store = Cache.at(studio["half_node"].resolved_cache_root).store
    assert all(store.has_blob(f.sha256) for f in fp16)
    assert not any(store.has_blob(f.sha256) for f in fp32)
    assert generate(studio, R["mixed"])["worker"].startswith("w-mixed16")


def test_a_hub_shaped_folder_publishes_without_its_clutter(studio):
    out = studio["outputs"]["hub"]
    skipped = next(line for line in out.splitlines() if line.startswith("skipped"))
    for clutter in ("README.md", ".gitattributes", "images/sample.png", "unet/diffusion_pytorch_model.bin"):
        assert clutter in skipped
    paths = {f.path for f in archive_of(studio["settings"]).read_manifest(ComponentRef("hub", "base", "v1")).files}
    assert not any(p.endswith((".md", ".png", ".bin", ".gitattributes")) for p in paths)
    assert generate(studio, R["hub"])["release"] == R["hub"]


@pytest.mark.parametrize("case,args,message", [
    ("pickle", ["m1", "base", "v1", "{bad}/model.ckpt"], "pickled checkpoint"),
    ("unknown", ["m2", "base", "v1", "{bad}/unknown.safetensors"], "unknown layout"),
    ("mismatch", ["m3", "base", "v1", "{sd_ckpt}", "--config", "{sd_config}", "--family", "sdxl"], "disagrees"),
    ("other-arch", ["studio", "lora", "v99", "{sd_kohya}"], "this model's base"),
    ("truncated", ["m4", "base", "v1", "{bad}/truncated.safetensors"], "truncated"),
    ("no-config", ["m5", "base", "v1", "{sd_ckpt}"], "pass --config DIR"),
])
def test_bad_inputs_are_refused_at_publish_with_one_line_and_nothing_uploaded(studio, files, case, args, message):
    settings = studio["settings"]
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    done = cli(settings, "publish", *argv)
    assert done.exit_code == 1, done.output
    assert len(done.output.strip().splitlines()) == 1 and message in done.output, done.output
    archive = archive_of(settings)
    assert argv[2] not in archive.list_versions(argv[0], argv[1])
    assert not (settings.home / "archive" / argv[0] / argv[1] / argv[2]).exists()


def test_dry_run_prints_the_plan_and_uploads_nothing(studio, files):
    done = cli(studio["settings"], "publish", "studio", "lora", "v30", str(files["kohya"]), "--dry-run")
    assert done.exit_code == 0, done.output
    assert "family sdxl" in done.output and "20.safetensors" in done.output and "nothing uploaded" in done.output
    assert "v30" not in archive_of(studio["settings"]).list_versions("studio", "lora")


def test_defaults_follow_the_family_whatever_the_layout():
    from workers.models import SingleFile, StableDiffusion2, StableDiffusionXL

    assert SingleFile("m").defaults({"family": "sdxl", "layout": "single-file"})["width"] == 1024
    assert SingleFile("m").defaults({"family": "sd", "layout": "single-file"})["height"] == 512
    assert StableDiffusion2("m").defaults({"family": "sd2"})["width"] == 768
    assert StableDiffusionXL("m").defaults({"family": "sdxl", "default_width": 64})["width"] == 64
