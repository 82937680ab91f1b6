"""Train the demo versions here, offline, on synthetic shapes: `python -m fleetctl.demo.train [--out DIR] [--quick]`.

A tiny AutoencoderKL first, then each UNet in its latent space with v-prediction on a zero-terminal-SNR schedule
(as SD 2.x-v and the "common diffusion noise schedules are flawed" fix train), then each LoRA on the base the demo
releases pair it with; every draw comes from a seeded generator, so a run at a fixed thread count repeats itself
byte for byte. It prints how long it took; weights/manifest.json records each committed version's run and seconds
at one thread on two shared CPU cores (bases 827 s and 178 s, resumed in stretches; the two LoRAs 110 s together).
`--quick` trains v1.1.0 and LoRA v2.3.0 a few dozen steps each (about a minute), for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import nets, shapes  # noqa: E402
from .trained import BY_REF, LORA_RANK, LORA_TARGETS, MANIFEST, TRAINED_VERSIONS, VAE_FILE, WEIGHTS  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """How long each stage trains (optimizer steps) and on how many images."""

    vae_steps: int = 400
    base_steps: int = 600
    finetune_steps: int = 200
    lora_steps: int = 400
    images: int = 720
    batch: int = 16
    lora_lr: float = 3e-3


FULL = Plan()
TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.")
QUICK = Plan(vae_steps=0, base_steps=0, finetune_steps=60, lora_steps=120, images=144, batch=16, lora_lr=1e-2)
QUICK_VERSIONS = ("nano-banana/base/v1.1.0", "nano-banana/lora/v2.3.0")
"""`--quick`: the committed v1.0.0 (white) fine-tuned into v1.1.0's dark look and the outline LoRA v2.3.0 trained on it,
each a few dozen steps (a LoRA at a higher rate): under two minutes, and both looks already the designed ones."""


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W in [-1, 1], as the VAE takes images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(images: torch.Tensor, steps: int, seed: int, log: Callable[[str], None]):
    """Train the VAE as a plain autoencoder on the latent means (sampling noise slows a tiny run down a lot), with
    shape pixels weighted up so colours come back true; its scaling factor is then set to 1 / latent std."""
    vae = nets.vae()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (16,), generator=g)]
        shape = ((batch - batch[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.1).float()
        z = vae.encode(batch).latent_dist.mean
        rec = ((vae.decode(z).sample - batch).pow(2) * (1 + 4 * shape)).mean()
        loss = rec + 1e-4 * z.pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step:4d}/{steps} reconstruction {rec.item():.4f}")
    vae.register_to_config(scaling_factor=latent_scale(vae, images))
    return vae.eval()


@torch.no_grad()
def latent_scale(vae, images: torch.Tensor) -> float:
    """1 / the spread of the VAE's latent means over the training images."""
    return float(1.0 / torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)]).std())


def vae_images(plan: Plan) -> torch.Tensor:
    """What the VAE learns from: every style, so every version's look can be decoded."""
    return torch.cat([_data(s, plan, 1)[0][: plan.images // 4] for s in shapes.STYLES])


def save_vae(path: Path, vae) -> None:
    from safetensors.torch import save_file

    save_file(_half(vae.state_dict()), path, metadata={"scaling_factor": repr(float(vae.config.scaling_factor))})


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """The training targets: scaled latent means (the pipeline decodes latents / scaling_factor)."""
    parts = [vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)]
    return torch.cat(parts) * vae.config.scaling_factor


class Conditioning:
    """Captions → what the UNet is conditioned on, exactly as the family's pipeline encodes a prompt.

    Dropped captions become the unconditional input classifier-free guidance uses at sampling time:
    zeros for SDXL (force_zeros_for_empty_prompt), the empty prompt for SD."""

    def __init__(self, family: str, encoders: list[Any], size: int = shapes.SIZE) -> None:
        self.family, self.encoders = family, encoders
        self.tokenizer = nets.tokenizer()
        self.time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        self._ids: dict[str, torch.Tensor] = {}

    def ids(self, captions: list[str]) -> torch.Tensor:
        for c in set(captions) - self._ids.keys():
            self._ids[c] = self.tokenizer(c, padding="max_length", max_length=77, truncation=True,
                                          return_tensors="pt").input_ids[0]
        return torch.stack([self._ids[c] for c in captions])

    def __call__(self, captions: list[str], dropped: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any] | None]:
        if not any(p.requires_grad for e in self.encoders for p in e.parameters()):
            return self._frozen(captions, dropped)
        return self._encode(captions, dropped)

    @torch.no_grad()
    def _frozen(self, captions: list[str], dropped: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """Frozen encoders give each caption the same output every step: encode each once (a run has 37)."""
        cache = self.__dict__.setdefault("_cache", {})
        keys = ["" if d else c for c, d in zip(captions, dropped.tolist(), strict=True)]
        for k in set(keys) - cache.keys():
            embeds, added = self._encode([k or captions[0]], torch.tensor([not k]))
            cache[k] = (embeds[0], None if added is None else added["text_embeds"][0])
        embeds = torch.stack([cache[k][0] for k in keys])
        if self.family == "sd":
            return embeds, None
        pooled = torch.stack([cache[k][1] for k in keys])
        return embeds, {"text_embeds": pooled, "time_ids": self.time_ids.expand(len(captions), -1)}

    def _encode(self, captions: list[str], dropped: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any] | None]:
        if self.family == "sd":
            captions = ["" if d else c for c, d in zip(captions, dropped.tolist(), strict=True)]
            return self.encoders[0](self.ids(captions))[0], None
        ids = self.ids(captions)
        out_1 = self.encoders[0](ids, output_hidden_states=True)
        out_2 = self.encoders[1](ids, output_hidden_states=True)
        keep = (~dropped).float()
        embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1) * keep[:, None, None]
        pooled = out_2.text_embeds * keep[:, None]
        return embeds, {"text_embeds": pooled, "time_ids": self.time_ids.expand(len(captions), -1)}


def train_unet(unet, latents: torch.Tensor, captions: list[str], cond: Conditioning, params: list, steps: int,
               batch: int, lr: float, seed: int, log: Callable[[str], None], name: str,
               checkpoint: Callable[[], None] | None = None) -> None:
    """V-prediction diffusion loss on the zero-terminal-SNR schedule at uniform timesteps; 10 % of captions
    dropped for guidance."""
    noise_schedule = nets.noise_schedule()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=g)
        dropped = torch.rand(batch, generator=g) < 0.1
        embeds, added = cond([captions[i] for i in idx.tolist()], dropped)
        pred = unet(noise_schedule.add_noise(x0, noise, t), t, embeds, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred, noise_schedule.get_velocity(x0, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} {step:4d}/{steps} loss {loss.item():.4f}")
            if checkpoint is not None and step:
                checkpoint()  # a stopped run resumes from here (--resume)
    unet.eval()


def add_lora(unet, seed: int):
    """A fresh rank-4 peft LoRA (lora_B starts at zero, so training starts from the base's behaviour)."""
    from peft import LoraConfig

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK * 2, target_modules=list(LORA_TARGETS), init_lora_weights=True)
    torch.manual_seed(seed)
    unet.requires_grad_(False)
    unet.add_adapter(config)
    return config, [p for n, p in unet.named_parameters() if "lora_" in n]


def _half(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def save_base(path: Path, modules: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        state.update(_half(module.state_dict(), prefix))
    save_file(state, path)


def save_lora(path: Path, unet, config) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    save_file(_half(get_peft_model_state_dict(unet)), path, metadata={"lora_config": json.dumps(meta)})
    unet.delete_adapters(["default"])


def _resume(path: Path, modules: dict[str, Any]) -> None:
    """Continue a base from weights an earlier run saved (training is resumable, in fresh stretches)."""
    from .trained import _load, _split

    state = _load(path)
    for prefix, module in modules.items():
        module.load_state_dict(_split(state, prefix))


def _committed(ref: str, out: Path) -> tuple[Any, list[Any]]:
    """A parent base this run did not train: from `out` when an earlier run left it there, else the committed one."""
    from .trained import load_base

    pipe = load_base(ref, out if (out / BY_REF[ref].file).exists() else WEIGHTS)
    return pipe.unet, [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]


def _data(style: str, plan: Plan, seed: int) -> tuple[torch.Tensor, list[str]]:
    images, captions = shapes.dataset(shapes.STYLES[style], plan.images, seed)
    return to_tensor(images), captions


def train_all(out: Path, plan: Plan = FULL, log: Callable[[str], None] = print, only: tuple[str, ...] = (),
              reuse_vae: bool = False, resume: bool = False, freeze_text: bool = False,
              resume_lr: float = 5e-4, lora_lr: float | None = None) -> dict:
    """Train every trained version (or `only` these refs, parents first) into `out`; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    wanted = [v for v in TRAINED_VERSIONS if not only or v.ref in only]
    have_vae = (out / VAE_FILE).exists()
    if plan.vae_steps and not only and not (reuse_vae and have_vae):
        t = time.perf_counter()
        vae = train_vae(vae_images(plan), plan.vae_steps, seed=1, log=log)
        save_vae(out / VAE_FILE, vae)
        seconds["vae"] = time.perf_counter() - t
    else:
        from .trained import load_vae

        # --reuse-vae or a partial run (--only) works in the latent space of the VAE already in `out`, else the committed
        # one's: the parents it fine-tunes or adapts were trained there
        source = out if have_vae and (reuse_vae or only) else WEIGHTS
        vae = load_vae(source)
        if source != out:
            import shutil

            shutil.copy(WEIGHTS / VAE_FILE, out / VAE_FILE)
    vae.eval()
    live: dict[str, tuple[Any, list[Any]]] = {}  # base ref → its UNet and text encoders, for the children
    for i, v in enumerate(wanted):
        t = time.perf_counter()
        seed = 100 + 10 * TRAINED_VERSIONS.index(v)
        pixels, captions = _data(v.style, plan, seed)
        latents = encode_latents(vae, pixels)
        if v.component == "base" and v.parent is None:
            unet = nets.sdxl_unet() if v.family == "sdxl" else nets.sd_unet()
            encoders = list(nets.sdxl_text_encoders()) if v.family == "sdxl" else [nets.sd_text_encoder()]
            lr = 1e-3
            if resume and (out / v.file).exists():
                _resume(out / v.file, {"unet.": unet, **dict(zip(TEXT_PREFIXES, encoders, strict=False))})
                lr, seed = resume_lr, seed + 1
                log(f"{v.ref}: resumed from {out / v.file}")
            if freeze_text:
                for e in encoders:
                    e.requires_grad_(False)
            params = [p for m in (unet, *encoders) for p in m.parameters() if p.requires_grad]
            modules = {"unet.": unet, **dict(zip(TEXT_PREFIXES, encoders, strict=False))}
            train_unet(unet, latents, captions, Conditioning(v.family, encoders), params, plan.base_steps,
                       plan.batch, lr, seed, log, v.ref, checkpoint=lambda m=modules, f=out / v.file: save_base(f, m))
        elif v.component == "base":
            unet = nets.sdxl_unet() if v.family == "sdxl" else nets.sd_unet()
            if resume and (out / v.file).exists():
                encoders = list(nets.sdxl_text_encoders()) if v.family == "sdxl" else [nets.sd_text_encoder()]
                _resume(out / v.file, {"unet.": unet, **dict(zip(TEXT_PREFIXES, encoders, strict=False))})
                log(f"{v.ref}: resumed from {out / v.file}")
            else:
                parent_unet, encoders = live[v.parent] if v.parent in live else _committed(v.parent, out)
                unet.load_state_dict(parent_unet.state_dict())
            for e in encoders:
                e.requires_grad_(False)
            modules = {"unet.": unet, **dict(zip(TEXT_PREFIXES, encoders, strict=False))}
            train_unet(unet, latents, captions, Conditioning(v.family, encoders), list(unet.parameters()),
                       plan.finetune_steps, plan.batch, 5e-4, seed, log, v.ref,
                       checkpoint=lambda m=modules, f=out / v.file: save_base(f, m))
        else:
            unet, encoders = live[v.parent] if v.parent in live else _committed(v.parent, out)
            for e in encoders:
                e.requires_grad_(False)
            config, params = add_lora(unet, seed)
            train_unet(unet, latents, captions, Conditioning(v.family, encoders), params, plan.lora_steps,
                       plan.batch, lora_lr or plan.lora_lr, seed, log, v.ref)
            save_lora(out / v.file, unet, config)
            unet.requires_grad_(True)
            seconds[v.ref] = time.perf_counter() - t
            continue
        for e in encoders:
            e.eval()
        save_base(out / v.file, {"unet.": unet, **dict(zip(TEXT_PREFIXES, encoders, strict=False))})
        live[v.ref] = (unet, encoders)
        seconds[v.ref] = time.perf_counter() - t
        log(f"{v.ref} trained in {seconds[v.ref]:.0f} s ({i + 1}/{len(wanted)})")
    old = json.loads((out / MANIFEST.name).read_text()) if (out / MANIFEST.name).exists() else {}
    runs = [r for r in (_without(r, {v.ref for v in wanted}) for r in old.get("runs", [])) if r["versions"]]
    run = {"versions": [v.ref for v in wanted], "vae_trained": "vae" in seconds, "plan": asdict(plan),
           "threads": torch.get_num_threads(), "seconds": {k: round(s, 1) for k, s in seconds.items()},
           "total_seconds": round(time.perf_counter() - started, 1)}
    meta = {"vae_scaling_factor": float(vae.config.scaling_factor), "runs": runs + [run]}
    (out / MANIFEST.name).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _without(run: dict, refs: set[str]) -> dict:
    """An earlier run's record less the versions this run retrains (the rest of it still describes committed weights)."""
    return {k: ([r for r in v if r not in refs] if k == "versions" else
                {r: x for r, x in v.items() if r not in refs} if k in ("seconds", "judged") else v)
            for k, v in run.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetctl.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where the weights go (default: the package's)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds: v1.1.0 fine-tuned dark and LoRA v2.3.0 trained, a few dozen steps each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; the same count repeats the same bytes")
    parser.add_argument("--reuse-vae", action="store_true", help="keep the VAE already in --out instead of training it")
    parser.add_argument("--resume", action="store_true", help="continue the bases from the weights in --out")
    parser.add_argument("--base-steps", type=int, help="optimizer steps for each base trained from scratch")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of a resumed base")
    parser.add_argument("--lora-lr", type=float, help="peak learning rate of the LoRAs (default 3e-3, --quick 1e-2)")
    parser.add_argument("--freeze-text", action="store_true", help="keep the text encoders of resumed bases as they are")
    parser.add_argument("--finetune-steps", type=int, help="optimizer steps for each base fine-tuned from another")
    parser.add_argument("--lora-steps", type=int, help="optimizer steps for each LoRA")
    parser.add_argument("--only", nargs="*", default=[], choices=sorted(BY_REF), help="train only these versions")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    only = tuple(args.only) or (QUICK_VERSIONS if args.quick else ())
    plan = QUICK if args.quick else FULL
    for field in ("base_steps", "finetune_steps", "lora_steps"):
        if getattr(args, field):
            plan = replace(plan, **{field: getattr(args, field)})
    meta = train_all(args.out, plan, only=only, reuse_vae=args.reuse_vae, resume=args.resume,
                     freeze_text=args.freeze_text, resume_lr=args.lr,
                     lora_lr=args.lora_lr)
    print(f"trained {len(meta['runs'][-1]['versions'])} versions into {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
