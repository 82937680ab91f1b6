"""Tiny but real diffusers pipelines, built offline from configs with seeded random weights.

They stand in for production checkpoints on machines with no hub access: the same classes, the same
files on disk (safetensors + JSON), the same loading code, only small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.settings import offline_environment
from workers.models.standard import bytes_to_unicode

offline_environment()

import torch  # noqa: E402

DEMO_MODEL = "nano-banana"
SD_DEMO_MODEL = "pixel-sd"
WUERSTCHEN_DEMO_MODEL = "tiny-wuerstchen"
SINGLE_FILE_DEMO_MODEL = "pixel-single"
SINGLE_FILE_CHECKPOINT = "48.safetensors"
LARGE_DEMO_MODEL = "nano-banana-large"


@dataclass(frozen=True)
class DemoVersion:
    model: str
    component: str
    version: str
    family: str
    seed: int
    size: str = "tiny"  # "large": the ~0.6 GB SDXL of build_sdxl(size="large"), for benchmarks only
    trained: bool = False  # built from the committed trained weights (fleetctl/demo/trained.py), not seeded noise


def _byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in the CLIP layout, with a handful of merges."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = []
    for a, b in [("e", "r"), ("a", "n"), ("t", "h"), ("i", "n"), ("o", "n</w>"), ("e", "r</w>")]:
        merges.append((a, b))
        tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_tokenizer(path: Path) -> int:
    from transformers import CLIPTokenizer

    vocab, merges = _byte_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(path)
    return len(vocab)


def _text_encoder(vocab_size: int, hidden: int, projection: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = _byte_vocab()
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        hidden_act="gelu",
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


def _vae(seed: int, channels: tuple[int, ...] = (32, 64)):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=list(channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        latent_channels=4,
        sample_size=64,
    )


TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
"""The UNet shape every tiny SD-family demo shares; each family adds its own conditioning."""


def build_sd(path: Path, seed: int) -> Path:
    """A tiny Stable Diffusion 1.x pipeline saved as a diffusers folder of safetensors."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    path.mkdir(parents=True, exist_ok=True)
    tok_dir = path / "tokenizer"
    vocab_size = save_tokenizer(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(vocab_size, 32, None, seed + 2),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        scheduler=DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


SDXL_SIZES = {
    "tiny": {
        "unet": {**TINY_UNET, "attention_head_dim": (2, 4), "transformer_layers_per_block": (1, 1)},
        "time_embed_dim": 8,
        "text_widths": (32, 48),  # text_encoder, text_encoder_2; the second one's projection is "pooled"
        "pooled": 32,
        "vae": (32, 64),
    },
    "large": {  # SDXL's layout with ~1/20 of its 2.6 B UNet parameters: ~0.6 GB of float32 in all
        "unet": {
            "block_out_channels": (256, 512),
            "layers_per_block": 2,
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (4, 8),  # heads of 64 channels, as in SDXL
            "transformer_layers_per_block": (1, 2),
        },
        "time_embed_dim": 256,
        "text_widths": (256, 384),
        "pooled": 256,
        "vae": (64, 128, 256, 256),  # four levels: latents at 1/8 of the image side, as in SDXL
    },
}
"""Shapes of the demo SDXL by size. "large" makes byte-bound benchmarks (cold start, L2 load) say something
about production checkpoints; "tiny" is what the tests and the fleet use, and its bytes must never change."""


def build_sdxl(path: Path, seed: int, size: str = "tiny") -> Path:
    """A seeded SDXL pipeline; the two text encoders get different widths, as in the real model."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    if size not in SDXL_SIZES:
        raise ValueError(f"unknown SDXL demo size {size!r}; choose one of {', '.join(SDXL_SIZES)}")
    shape = SDXL_SIZES[size]
    width_1, width_2 = shape["text_widths"]
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = save_tokenizer(path / "tokenizer")
    save_tokenizer(path / "tokenizer_2")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **shape["unet"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=shape["time_embed_dim"],
        projection_class_embeddings_input_dim=shape["pooled"] + 6 * shape["time_embed_dim"],
        cross_attention_dim=width_1 + width_2,
        norm_num_groups=32,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(seed + 1, shape["vae"]),
        text_encoder=_text_encoder(vocab_size, width_1, None, seed + 2),
        text_encoder_2=_text_encoder(vocab_size, width_2, shape["pooled"], seed + 3),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"
        ),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _wake(module, seed: int, scale: float = 0.2) -> None:
    """Give every all-zero parameter small random values. Würstchen zero-initialises its gates and
    residual gammas (an untrained block is an identity), which would make a random tiny model ignore its prompt."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def build_wuerstchen(path: Path, seed: int) -> Path:
    """A tiny Würstchen: `prior/` and `decoder/` pipeline folders in one base version (see models/wuerstchen.py).

    Sizes are chosen so a 64×64 request gives a 64×64 image: the prior works at 1/32 of the image side
    (resolution_multiple), the decoder at 8× the prior's side, and the VQ-GAN decodes 4× up.
    """
    from diffusers import DDPMWuerstchenScheduler, WuerstchenDecoderPipeline, WuerstchenPriorPipeline
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    tok_dir = path / "tokenizer-build"
    vocab_size = save_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    prior = WuerstchenPrior(c_in=4, c=32, c_cond=32, c_r=8, depth=1, nhead=2, dropout=0.0)
    decoder = WuerstchenDiffNeXt(
        c_in=4, c_out=4, c_r=8, patch_size=1, c_cond=32, c_hidden=[16, 32], nhead=[-1, 2], blocks=[1, 1],
        level_config=["CT", "CTA"], inject_effnet=[False, True], effnet_embd=4, clip_embd=32, dropout=0.0,
    )
    vqgan = PaellaVQModel(
        up_down_scale_factor=2, levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=16
    )
    for i, module in enumerate((prior, decoder, vqgan)):
        _wake(module, seed + 10 + i)
    WuerstchenPriorPipeline(
        tokenizer=tokenizer, text_encoder=_text_encoder(vocab_size, 32, None, seed + 1), prior=prior,
        scheduler=DDPMWuerstchenScheduler(), resolution_multiple=32.0,
    ).save_pretrained(path / "prior", safe_serialization=True)
    WuerstchenDecoderPipeline(
        tokenizer=tokenizer, text_encoder=_text_encoder(vocab_size, 32, None, seed + 2), decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan, latent_dim_scale=8.0,
    ).save_pretrained(path / "decoder", safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)
    return path


def build_single_file(path: Path, seed: int) -> Path:
    """A tiny SD base as one original-layout checkpoint plus a weightless diffusers `config/` folder."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from workers.models.original_layout import save_original_checkpoint
    from workers.models.single_file import CONFIG_FOLDER

    path.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + "-diffusers")
    build_sd(staging, seed)
    pipe = StableDiffusionPipeline.from_pretrained(staging, local_files_only=True, use_safetensors=True)
    save_original_checkpoint(pipe, path / SINGLE_FILE_CHECKPOINT)
    shutil.copytree(staging, path / CONFIG_FOLDER, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    shutil.rmtree(staging)
    return path


def publish_single_file(archive, ref, folder: Path, meta: dict) -> None:
    """A single-file checkpoint folder (checkpoint + config/) planned, checked, converted and published the way
    `warmfleet publish` does it (workers/models/convert.py); `meta` is added to what the plan records."""
    import tempfile

    from workers.models.convert import convert_single_file
    from workers.models.layouts import CONFIG_FOLDER, plan_version
    from workers.models.skeleton import check_boots

    plan = plan_version(folder, "base", config=folder / CONFIG_FOLDER)
    check_boots(plan)
    with tempfile.TemporaryDirectory(prefix="warmfleet-convert-") as tmp:
        converted = convert_single_file(plan, Path(tmp) / "converted")
        archive.publish(ref, Path(tmp) / "converted", meta={**converted.meta, **meta})


BASE_BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "wuerstchen": build_wuerstchen, "single-file": build_single_file}


def build_lora(base_dir: Path, family: str, path: Path, seed: int, rank: int = 4) -> Path:
    """A non-zero LoRA for the base's UNet, saved with its adapter metadata (alpha survives loading)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet", use_safetensors=True)
    config = LoraConfig(
        r=rank, lora_alpha=rank * 2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    torch.manual_seed(seed)
    unet.add_adapter(config)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    layers = get_peft_model_state_dict(unet)
    path.mkdir(parents=True, exist_ok=True)
    pipeline_cls = _pipeline_class(family)
    pipeline_cls.save_lora_weights(
        path, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True
    )
    (path / "lora.json").write_text(json.dumps({"family": family, "rank": rank, "alpha": rank * 2}))
    return path


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[family]


DEMO_VERSIONS = (
    DemoVersion(DEMO_MODEL, "base", "v1.0.0", "sdxl", 1000, trained=True),  # white background
    DemoVersion(DEMO_MODEL, "base", "v1.1.0", "sdxl", 1100, trained=True),  # black background
    DemoVersion(DEMO_MODEL, "lora", "v2.3.0", "sdxl", 2300, trained=True),  # outlined shapes
    DemoVersion(DEMO_MODEL, "lora", "v2.3.1", "sdxl", 2310, trained=True),  # gray background
    DemoVersion(SD_DEMO_MODEL, "base", "v1.0.0", "sd", 3000),
    DemoVersion(SD_DEMO_MODEL, "lora", "v1.0.0", "sd", 3100),
    DemoVersion(WUERSTCHEN_DEMO_MODEL, "base", "v1.0.0", "wuerstchen", 4000),
    DemoVersion(SINGLE_FILE_DEMO_MODEL, "base", "v1.0.0", "single-file", 5000),
)
RANDOM_DEMO_VERSIONS = tuple(DemoVersion(v.model, v.component, v.version, v.family, v.seed, v.size)
                             for v in DEMO_VERSIONS)
"""The same versions with seeded random weights only (64 px, 4 steps): what the test suite's shared archive and the
benchmarks serve, whose expectations (sizes, adapter shapes, timings) predate the trained demo."""
DEMO_RELEASES = (
    f"{DEMO_MODEL}@base-v1.0.0+lora-v2.3.0",  # the previous release: kept warm so rollback never waits
    f"{DEMO_MODEL}@base-v1.1.0+lora-v2.3.1",  # the active release
)
SD_DEMO_RELEASE = f"{SD_DEMO_MODEL}@base-v1.0.0+lora-v1.0.0"
WUERSTCHEN_DEMO_RELEASE = f"{WUERSTCHEN_DEMO_MODEL}@base-v1.0.0"
SINGLE_FILE_DEMO_RELEASE = f"{SINGLE_FILE_DEMO_MODEL}@base-v1.0.0"
SHARED_BASE_RELEASES = (
    f"{DEMO_MODEL}@base-v1.1.0+lora-v2.3.0",  # the previous LoRA on the active base …
    f"{DEMO_MODEL}@base-v1.1.0+lora-v2.3.1",  # … and the active one: one worker, one base, two adapters
)
DEMO_META = {"default_steps": 4, "default_guidance": 5.0, "default_width": 64, "default_height": 64}
LARGE_DEMO_VERSIONS = (  # not in DEMO_VERSIONS: built only by the benchmarks that ask for --size large
    DemoVersion(LARGE_DEMO_MODEL, "base", "v1.0.0", "sdxl", 6000, size="large"),
    DemoVersion(LARGE_DEMO_MODEL, "lora", "v1.0.0", "sdxl", 6100, size="large"),
)
LARGE_DEMO_RELEASE = f"{LARGE_DEMO_MODEL}@base-v1.0.0+lora-v1.0.0"
FAMILY_META = {
    "wuerstchen": {"default_guidance": 4.0, "default_decoder_steps": 2, "default_decoder_guidance": 0.0},
}


def _build_base(v: DemoVersion, folder: Path, seed: int) -> Path:
    """The base a version is (or a LoRA version is trained on): by family, and for SDXL by size."""
    if v.family == "sdxl":
        return build_sdxl(folder, seed, size=v.size)
    if v.size != "tiny":
        raise ValueError(f"{v.model} {v.version}: only the sdxl demo comes in size {v.size!r}")
    return BASE_BUILDERS[v.family](folder, seed)


def publish_demo(archive, workdir: Path, versions=DEMO_VERSIONS, log=print) -> list[str]:
    """Build the demo versions missing from `archive` and publish them; returns what was published."""
    from cachemgr.names import ComponentRef

    published = []
    bases: dict[tuple[str, str], Path] = {}
    for v in versions:
        ref = ComponentRef(v.model, v.component, v.version)
        if v.component == "base":
            bases.setdefault((v.model, v.family), workdir / f"{v.model}-{v.version}-base")
        if archive.has_version(ref):
            continue
        folder = workdir / f"{v.model}-{v.component}-{v.version}"
        if v.trained:
            from .trained import TRAINED_META, build_trained

            build_trained(str(ref), folder)
            meta = {"family": v.family, "demo": True, **({**DEMO_META, **TRAINED_META} if v.component == "base" else {})}
            archive.publish(ref, folder, meta=meta)
            published.append(str(ref))
            log(f"published {ref} (trained)")
            continue
        if v.component == "base":
            _build_base(v, folder, v.seed)
            bases[(v.model, v.family)] = folder
        else:
            base_dir = bases.get((v.model, v.family))
            if base_dir is None or not base_dir.exists():
                base_dir = workdir / f"{v.model}-lora-base"
                _build_base(v, base_dir, v.seed - 1)
            build_lora(base_dir, v.family, folder, v.seed)
        base_meta = {**DEMO_META, **FAMILY_META.get(v.family, {})} if v.component == "base" else {}
        meta = {"family": v.family, "demo": True, **base_meta}
        if v.family == "single-file":  # as `warmfleet publish` does: converted once, the diffusers folder published
            publish_single_file(archive, ref, folder, {"demo": True, **base_meta})
        else:
            archive.publish(ref, folder, meta=meta)
        published.append(str(ref))
        log(f"published {ref}")
    return published
