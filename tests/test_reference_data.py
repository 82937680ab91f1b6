"""The reference scenario's generated files (bench/_reference_data.py) are what users bring: at scale 1 the base has
the real SDXL key layout and shapes and the kohya LoRA ~1.2 GB on real modules; at a small scale both still publish
through `warmfleet publish` (the base with its scaled --config) and load with diffusers, the LoRA on every targeted
module of the UNet and both text encoders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import _reference_data as data
from fleetctl.cli import main as cli
from workers.models import standard


def test_full_size_base_and_lora_are_sdxl_layout_and_sizes():
    shapes = dict(data.base_tensors(standard.CONFIGS / "sdxl"))
    assert len(shapes) == 2513
    assert sum(2 * math.prod(s) for s in shapes.values()) == data.BASE_BYTES
    for key, shape in standard.SIGNATURES["sdxl"].items():
        assert shapes[key][:len(shape)] == shape, key
    modules = data.lora_modules(standard.CONFIGS / "sdxl")
    rank, tensors = data.lora_tensors(modules, data.LORA_BYTES)
    size = sum(2 * math.prod(s) if s else 2 for _, s in tensors)
    assert abs(size - data.LORA_BYTES) < 0.02 * data.LORA_BYTES and rank % 4 == 0
    stems = {stem for stem, _, _ in modules}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in stems
    assert "lora_te1_text_model_encoder_layers_11_self_attn_out_proj" in stems
    assert "lora_te2_text_model_encoder_layers_31_self_attn_q_proj" in stems
    assert len(stems) == 560 + 48 + 128


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("reference") / "release"
    return root, data.build(root, 0.005)


def test_a_small_build_is_deterministic_and_v2_changes_a_few_tensors(small, tmp_path):
    root, folders = small
    again = data.build(tmp_path / "again", 0.005)
    for name in folders:
        one = next(folders[name].glob("*.safetensors")).read_bytes()
        assert one == next(again[name].glob("*.safetensors")).read_bytes(), name
    v1 = (folders["base-v1"] / data.CHECKPOINT).read_bytes()
    v2 = (folders["base-v2"] / data.CHECKPOINT).read_bytes()
    assert len(v1) == len(v2) and v1 != v2
    differing = sum(a != b for a, b in zip(v1[::4096], v2[::4096], strict=True)) * 4096
    assert 0 < differing <= 2 * data.changed_bytes(root)


def test_a_small_build_publishes_and_loads_with_its_lora_on_every_part(small, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    root, folders = small
    env = {"FLEET_HOME": str(tmp_path / "home"), "FLEET_BROKER_URL": "redis://127.0.0.1:1/0"}
    base = folders["base-v1"] / data.CHECKPOINT
    refused = CliRunner().invoke(cli, ["publish", "ref", "base", "v1", str(base)], env=env)
    assert refused.exit_code == 1 and "--config" in refused.output
    done = CliRunner().invoke(cli, ["publish", "ref", "base", "v1", str(base), "--config", str(data.config_dir(root))],
                              env=env)
    assert done.exit_code == 0, done.output
    lora = folders["lora-v1"] / data.LORA_FILE
    done = CliRunner().invoke(cli, ["publish", "ref", "lora", "v1", str(lora)], env=env)
    assert done.exit_code == 0, done.output
    assert "layout lora" in done.output

    pipe = StableDiffusionXLPipeline.from_single_file(str(base), config=str(data.config_dir(root)),
                                                      local_files_only=True, torch_dtype=torch.float32)
    before = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    assert torch.equal(before.half(), _tensor(base, "model.diffusion_model.input_blocks.4.1.transformer_blocks.0"
                                                    ".attn1.to_q.weight"))
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="style")
    assert pipe.get_list_adapters() == {"unet": ["style"], "text_encoder": ["style"], "text_encoder_2": ["style"]}
    lora_layers = sum(1 for name, _ in pipe.unet.named_modules() if name.endswith("lora_A.style"))
    assert lora_layers == sum(1 for stem, _, _ in data.lora_modules(data.config_dir(root)) if "_unet_" in stem)
    meta = json.loads((root / "built.json").read_text())
    assert meta["standard"] is False and meta["lora_rank"] >= 4


def _tensor(path: Path, name: str):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.get_tensor(name)
