"""Single-file checkpoints at their real dimensions publish with no config folder: the standard SD 1.x, SD 2.x and
SDXL configs ship with the project, the CLIP tokenizer is derived from the installed BPE vocabulary, and which
config applies is read from the checkpoint's header.

The checkpoints here are real-size safetensors files whose data is a sparse hole (a 6.9 GB SDXL file costs a few
hundred KB of disk): publish reads headers only, so they exercise exactly what a user's `48.safetensors` would.
Loading and running such a file in a worker takes minutes and ~7 GB of memory on CPU; bench/check_real_single_file.py
does that by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetctl.demo import formats
from workers.models import standard
from workers.models.detect import LayoutError
from workers.models.layouts import plan_version
from workers.models.skeleton import check_boots, meta_module

PUBLISHED_PARAMETERS = {  # parameter counts of the released checkpoints' diffusers modules
    "sd": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("real-size")
    return {family: formats.save_sparse_checkpoint(formats.original_shapes(standard.CONFIGS / family),
                                                   out / f"{family}.safetensors") for family in standard.STANDARD}


@pytest.mark.parametrize("family", standard.STANDARD)
def test_the_packaged_configs_have_the_released_models_dimensions(family):
    index = json.loads((standard.CONFIGS / family / "model_index.json").read_text())
    for part, count in PUBLISHED_PARAMETERS[family].items():
        module = meta_module(standard.CONFIGS / family / part, *index[part])
        assert sum(p.numel() for p in module.parameters()) == count, part


def test_the_tokenizer_is_clips_own_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    folder = standard.write_config("sdxl", tmp_path / "config")
    one = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    two = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    assert len(one) == standard.VOCAB_SIZE
    # the ids OpenAI's CLIP gives this prompt
    assert one("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert two("a photo of a cat").input_ids == one("a photo of a cat").input_ids
    assert one.pad_token == "<|endoftext|>" and two.pad_token == "!" and two.pad_token_id == 0
    assert one.model_max_length == 77


@pytest.mark.parametrize("family,parts", [
    ("sd", ["unet", "vae", "text_encoder", "tokenizer"]),
    ("sd2", ["unet", "vae", "text_encoder", "tokenizer"]),
    ("sdxl", ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]),
])
def test_a_real_size_single_file_publishes_with_the_standard_config(sparse, family, parts):
    plan = plan_version(sparse[family], "base")
    check_boots(plan)  # every weight the packaged config's modules need is in the header, at its shape
    assert plan.family == family and plan.layout == "single-file" and plan.meta["config"] == "standard"
    assert plan.precision[f"{family}.safetensors"] == "fp16"
    for part in parts:
        assert any(rel.startswith(f"config/{part}/") for rel in plan.generated), part
    tokenizers = [rel for rel in plan.generated if rel.endswith(("vocab.json", "merges.txt"))]
    assert len(tokenizers) == 2 * sum(p.startswith("tokenizer") for p in parts)
    index = json.loads(plan.generated["config/model_index.json"].read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    assert any(line.startswith("config: the standard") for line in plan.describe())


def test_an_sd2_file_is_told_from_an_sd1_file_by_its_text_encoder(sparse):
    sd2, sd1 = plan_version(sparse["sd2"], "base"), plan_version(sparse["sd"], "base")
    assert json.loads(sd2.generated["config/scheduler/scheduler_config.json"].read_text())["prediction_type"] == \
        "v_prediction"
    assert json.loads(sd2.generated["config/unet/config.json"].read_text())["cross_attention_dim"] == 1024
    assert json.loads(sd1.generated["config/unet/config.json"].read_text())["cross_attention_dim"] == 768


def test_a_file_off_the_standard_shapes_is_refused_asking_for_its_config(tmp_path):
    shapes = formats.original_shapes(standard.CONFIGS / "sd")
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)  # an inpainting UNet
    path = formats.save_sparse_checkpoint(shapes, tmp_path / "inpaint.safetensors")
    with pytest.raises(LayoutError) as err:
        plan_version(path, "base")
    message = str(err.value)
    assert "\n" not in message and "not a standard SD 1.x model" in message and "pass --config DIR" in message
    assert "[320, 9, 3, 3]" in message


def test_a_missing_vocabulary_is_one_line_naming_the_fix(sparse, monkeypatch):
    monkeypatch.setattr(standard.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LayoutError) as err:
        plan_version(sparse["sd"], "base")
    assert "\n" not in str(err.value) and "pip install --no-deps clip-anytorch" in str(err.value)


def test_publish_dry_run_of_a_real_size_sdxl_file_needs_no_config(sparse, tmp_path):
    from click.testing import CliRunner

    from fleetctl.cli import main

    done = CliRunner().invoke(main, ["publish", "studio", "base", "v48", str(sparse["sdxl"]), "--dry-run"],
                              env={"FLEET_HOME": str(tmp_path), "FLEET_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert done.exit_code == 0, done.output
    assert "family sdxl" in done.output and "config/tokenizer_2/vocab.json" in done.output
    assert "config: the standard SDXL base config" in done.output and "nothing uploaded" in done.output
