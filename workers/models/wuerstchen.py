"""Würstchen: a text-conditioned prior makes small image embeddings, a decoder turns them into pixels.

Layout of a base version (one component, so prior and decoder are always published and rolled back
together — the decoder is trained on its prior's embeddings and a mismatched pair makes garbage):

    prior/     a WuerstchenPriorPipeline folder   (tokenizer, text_encoder, prior, scheduler, model_index.json)
    decoder/   a WuerstchenDecoderPipeline folder (tokenizer, text_encoder, decoder, vqgan, scheduler, …)

diffusers 0.42 moved Würstchen to `pipelines.deprecated`, and `from_pretrained` can no longer resolve the
["diffusers", "WuerstchenPrior"] entries of a model_index.json; so each part is loaded by its class here, and
the pipeline settings (resolution_multiple, latent_dim_scale, …) are read from the model_index.json files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cachemgr import SnapshotStore
from cachemgr.names import ComponentRef
from tasks.requests import GenerateRequest

from .base import LoadError, ModelBuilder

PRIOR_SETTINGS = ("latent_mean", "latent_std", "resolution_multiple")
DECODER_SETTINGS = ("latent_dim_scale",)


def _settings(folder: Path, names: tuple[str, ...]) -> dict[str, Any]:
    index = json.loads((folder / "model_index.json").read_text())
    return {name: index[name] for name in names if name in index}


def _text_parts(folder: Path, torch_dtype: Any) -> dict[str, Any]:
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
        "text_encoder": CLIPTextModel.from_pretrained(
            folder / "text_encoder", local_files_only=True, use_safetensors=True, dtype=torch_dtype
        ),
    }


def load_prior(folder: Path, torch_dtype: Any) -> Any:
    from diffusers import DDPMWuerstchenScheduler, WuerstchenPriorPipeline
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    return WuerstchenPriorPipeline(
        prior=WuerstchenPrior.from_pretrained(
            folder / "prior", local_files_only=True, use_safetensors=True, dtype=torch_dtype
        ),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(folder / "scheduler", local_files_only=True),
        **_text_parts(folder, torch_dtype),
        **_settings(folder, PRIOR_SETTINGS),
    )


def load_decoder(folder: Path, torch_dtype: Any) -> Any:
    from diffusers import DDPMWuerstchenScheduler, WuerstchenDecoderPipeline
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt

    options = {"local_files_only": True, "use_safetensors": True, "dtype": torch_dtype}
    return WuerstchenDecoderPipeline(
        decoder=WuerstchenDiffNeXt.from_pretrained(folder / "decoder", **options),
        vqgan=PaellaVQModel.from_pretrained(folder / "vqgan", **options),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(folder / "scheduler", local_files_only=True),
        **_text_parts(folder, torch_dtype),
        **_settings(folder, DECODER_SETTINGS),
    )


def combine(prior: Any, decoder: Any) -> Any:
    """One callable pipeline. The combined pipeline rebuilds its two halves with default settings, so the
    loaded ones are put back; otherwise a non-default resolution_multiple is silently ignored."""
    from diffusers import WuerstchenCombinedPipeline

    pipe = WuerstchenCombinedPipeline(
        tokenizer=decoder.tokenizer,
        text_encoder=decoder.text_encoder,
        decoder=decoder.decoder,
        scheduler=decoder.scheduler,
        vqgan=decoder.vqgan,
        prior_tokenizer=prior.tokenizer,
        prior_text_encoder=prior.text_encoder,
        prior_prior=prior.prior,
        prior_scheduler=prior.scheduler,
    )
    pipe.prior_pipe.register_to_config(**{k: prior.config[k] for k in PRIOR_SETTINGS})
    pipe.decoder_pipe.register_to_config(**{k: decoder.config[k] for k in DECODER_SETTINGS})
    return pipe


class Wuerstchen(ModelBuilder):
    family = "wuerstchen"
    pipeline_class_name = "WuerstchenCombinedPipeline"
    supports_lora = False  # a LoRA would target the prior; no demo or release needs it yet

    def load_pipeline(self, store: SnapshotStore, base: ComponentRef, torch_dtype: Any) -> Any:
        root = store.path(base)
        for part in ("prior", "decoder"):
            if not (root / part / "model_index.json").is_file():
                raise LoadError(f"{base} is not a Würstchen base: it has no {part}/model_index.json")
        return combine(load_prior(root / "prior", torch_dtype), load_decoder(root / "decoder", torch_dtype))

    def defaults(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "steps": int(meta.get("default_steps", 30)),
            "guidance": float(meta.get("default_guidance", 4.0)),
            "width": int(meta.get("default_width", 1024)),
            "height": int(meta.get("default_height", 1024)),
            "decoder_steps": int(meta.get("default_decoder_steps", 12)),
            "decoder_guidance": float(meta.get("default_decoder_guidance", 0.0)),
        }

    @staticmethod
    def call_kwargs(request: GenerateRequest, params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        """A job's steps and guidance drive the prior (where the prompt matters); the decoder keeps the
        release's own settings, as Würstchen's authors recommend."""
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "width": params["width"],
            "height": params["height"],
            "prior_num_inference_steps": params["steps"],
            "prior_guidance_scale": params["guidance"],
            "num_inference_steps": defaults["decoder_steps"],
            "decoder_guidance_scale": defaults["decoder_guidance"],
        }
