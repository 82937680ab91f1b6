"""The GPU run (`python -m bench gpu`): a full-size SDXL-architecture release (random weights, built offline on the
GPU in fp16), published, synced and served by a real fleet on cuda, measured against the bare thing in one run:

gpu.image_p50_s / gpu.image_p95_s    fleet seconds per image at 1024², 30 steps (send → result)
gpu.fleet_over_bare_p50              that p50 over a bare diffusers call on the same GPU, same pipeline, same size
gpu.l2_to_device_over_raw_read       the worker's L2 → device load over a raw read of the same files
gpu.lora_switch_ms                   switching between two resident LoRA adapters (set_adapters)
gpu.worker_memory_gib                device memory the worker reserved, as it reports it
gpu.batching_ratio_depth4            one batched call of 4 over 4 single calls (seconds per image)
Each entry names the GPU, driver, CUDA, torch and diffusers versions. About 5–8 minutes on one data-centre GPU.
Where no GPU is present it says so in one line and exits 2."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

MODEL = "gpu-bench"
RELEASE = f"{MODEL}@base-v1.0.0+lora-v1.0.0"
SIZE, STEPS, IMAGES = 1024, 30, 8
UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def gpu_identity() -> str:
    import diffusers
    import torch

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        driver = "?"
    return (f"{torch.cuda.get_device_name(0)}, driver {driver}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}")


def build_full_sdxl(path: Path) -> Path:
    """SDXL's architecture at full size (2.6 B UNet, CLIP-L + bigG, the 4-level VAE), random weights, fp16."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from fleetctl.demo.builders import save_tokenizer

    vocab = save_tokenizer(path / "tokenizer")
    save_tokenizer(path / "tokenizer_2")
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                  pad_token_id=vocab - 1, hidden_act="gelu")
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**UNET).half()
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=1024,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, scaling_factor=0.13025).half()
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, **common)).half()
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         **common)).half()
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading"))
    pipe.save_pretrained(path / "base", safe_serialization=True)
    return path / "base"


def timed(fn) -> float:  # noqa: ANN001
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench gpu: no CUDA device here (torch sees none); run it on a GPU node")
        return 2
    from _results import entry, merge_results, write_section
    from diffusers import StableDiffusionXLPipeline

    from cachemgr import LocalArchive
    from cachemgr.names import ComponentRef
    from fleetctl.demo.builders import build_lora
    from tasks.settings import FleetSettings
    from tests.support import RedisServer, start_worker, wait_warm

    identity = gpu_identity()
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    base = build_full_sdxl(work)
    loras = [build_lora(base, "sdxl", work / f"lora{i}", seed=10 + i, rank=64) for i in (0, 1)]
    archive = LocalArchive(work / "archive")
    meta = {"family": "sdxl", "default_steps": STEPS, "default_width": SIZE, "default_height": SIZE}
    archive.publish(ComponentRef(MODEL, "base", "v1.0.0"), base, meta=meta)
    archive.publish(ComponentRef(MODEL, "lora", "v1.0.0"), loras[0], meta={})
    archive.publish(ComponentRef(MODEL, "lora", "v1.1.0"), loras[1], meta={})

    # bare: the same files, straight into diffusers on the same GPU
    raw_read = timed(lambda: [p.read_bytes() for p in base.rglob("*.safetensors")])
    pipe = StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=torch.float16, local_files_only=True).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a leather jacket", num_inference_steps=STEPS, width=SIZE, height=SIZE)
    timed(lambda: pipe(**call))  # warm-up
    bare = [timed(lambda: pipe(**call)) for _ in range(5)]
    single = statistics.median(timed(lambda: pipe(**call)) for _ in range(2))
    batched = timed(lambda: pipe(**{**call, "prompt": [call["prompt"]] * 4})) / 4
    pipe.load_lora_weights(str(loras[0]), adapter_name="a")
    pipe.load_lora_weights(str(loras[1]), adapter_name="b")
    switches = [timed(lambda n=n: pipe.set_adapters([n])) for n in ("a", "b") * 10]
    pipe = None  # the fleet worker loads its own copy
    torch.cuda.empty_cache()

    server = RedisServer(work / "redis", appendonly=False).start()
    worker = None
    try:
        settings = FleetSettings(home=work / "home", broker_url=server.url, archive_url=archive.root.as_uri(),
                                 device="cuda:0", dtype="float16", node_name="gpubench", route_cache_ttl=0.0)
        import redis

        import tasks
        from fleetstate.registry import WarmRegistry

        tasks.configure(settings)
        worker = start_worker(settings, [RELEASE], "gpu0", work / "logs", wait=False)
        wait_warm(settings, worker, timeout=480)
        tasks.generate.delay("warm-up", seed=0, release=RELEASE).get(timeout=300)
        fleet = []
        for i in range(IMAGES):
            started = time.perf_counter()
            tasks.generate.delay(call["prompt"], seed=i, release=RELEASE).get(timeout=300)
            fleet.append(time.perf_counter() - started)
        state = {w.worker: w for w in WarmRegistry(redis.Redis.from_url(server.url)).workers()}["gpu0@gpubench"]
        load = [e for e in (settings.home / "events.jsonl").read_text().splitlines() if '"L1_LOAD"' in e][-1]
        import json

        load_seconds = float(json.loads(load)["seconds"])
    finally:
        if worker is not None:
            worker.stop()
        server.stop()

    p50 = statistics.median(fleet)
    p95 = sorted(fleet)[max(0, round(0.95 * len(fleet)) - 1)]
    entries = [
        entry("gpu.image_p50_s", round(p50, 3), "s", "<= 3.3"),
        entry("gpu.image_p95_s", round(p95, 3), "s", "<= 3.5"),
        entry("gpu.fleet_over_bare_p50", round(p50 / statistics.median(bare), 3), "x", "<= 1.05"),
        entry("gpu.l2_to_device_over_raw_read", round(load_seconds / raw_read, 3), "x"),
        entry("gpu.lora_switch_ms", round(statistics.median(switches) * 1000, 2), "ms", "<= 50"),
        entry("gpu.worker_memory_gib", round(state.mem_reserved / 2**30, 2), "GiB"),
        entry("gpu.batching_ratio_depth4", round(batched / single, 3), "x", "< 1"),
    ]
    for e in entries:
        e["machine"] = identity
    merge_results(entries)
    rows = "\n".join(f"| `{e['name']}` | {e['value']} {e['unit']} | {e['target'] or ''} |" for e in entries)
    write_section("gpu", f"\n## GPU (`python -m bench gpu`)\n\n{identity}; SDXL architecture at full size, random "
                         f"weights, fp16, {SIZE}², {STEPS} steps, {IMAGES} fleet images.\n\n| metric | value | target |"
                         f"\n|---|---|---|\n{rows}\n")
    print(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
