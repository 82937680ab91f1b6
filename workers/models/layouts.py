"""From what a user has to what a worker boots: the plan of a version before it is published.

A user has a diffusers folder (sharded or not, fp32 and/or fp16 variants, maybe straight from the hub with its
README, images and pickled twins), one single-file checkpoint (`48.safetensors`), or a LoRA under any name in
kohya/A1111, diffusers or PEFT format. `plan_version` reads headers and config JSON only, decides the family and
the layout, skips clutter (and lists it), refuses what would not boot with one line, and says which files go up
and what the manifest records (family, layout, checkpoint or LoRA file name, precision of every weight file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachemgr.variants import files_for, is_weights, variant_for, variant_of, wanted_files

from .detect import (
    CLUTTER_NAMES,
    CLUTTER_SUFFIXES,
    FAMILY_NAMES,
    PICKLED_SUFFIXES,
    LayoutError,
    base_context_width,
    folder_family,
    lora_info,
    precision,
    read_header,
    single_file_family,
)

LAYOUT_VERSION = 2
"""Meta written by this planner carries "layout_version"; versions published before it carry none and load as before."""
CONFIG_FOLDER = "config"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
__all__ = ["VersionPlan", "plan_version", "files_for", "is_weights", "variant_for", "variant_of", "wanted_files"]
@dataclass
class VersionPlan:
    component: str
    family: str
    layout: str  # diffusers | single-file | wuerstchen | lora
    files: dict[str, Path] = field(default_factory=dict)
    generated: dict[str, Path] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    precision: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    workdir: Any = None  # a TemporaryDirectory holding generated files, removed with the plan

    @property
    def total_size(self) -> int:
        return sum(p.stat().st_size for p in {**self.files, **self.generated}.values())

    def stage(self, into: Path) -> Path:
        """A folder that holds exactly what is uploaded: links to the user's files, copies of generated ones."""
        for rel, src in {**self.files, **self.generated}.items():
            dest = into / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dest)
            except OSError:
                os.symlink(src.resolve(), dest)
        return into

    def describe(self) -> list[str]:
        variants = sorted({v for rel in self.files if (v := variant_of(rel))})
        lines = [f"family {self.family} ({FAMILY_NAMES.get(self.family, self.family)}), layout {self.layout}"
                 + (f", variants {', '.join(variants)}" if variants else ""),
                 f"upload {len(self.files) + len(self.generated)} files, {self.total_size} bytes:"]
        for rel in sorted({**self.files, **self.generated}):
            tag = self.precision.get(rel, "generated" if rel in self.generated else "")
            lines.append(f"  {rel}" + (f"  [{tag}]" if tag else ""))
        lines += self.notes
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}: {', '.join(sorted(self.skipped))}")
        return lines


def _refuse_pickle(path: Path) -> None:
    raise LayoutError(f"{path.name} is a pickled checkpoint, which is never loaded; convert it to safetensors "
                      "(e.g. safetensors.torch.save_file) and publish that")


def _check_family(given: str | None, detected: str, what: str) -> str:
    if given and given != detected and not (given == "single-file" and what.endswith("single-file checkpoint")):
        raise LayoutError(f"--family {given} disagrees with the files: {what} is a {FAMILY_NAMES.get(detected, detected)} "
                          f"model ({detected}); drop --family or publish the right files")
    return detected


def _lora_family(info: Any, name: str, given: str | None, base: tuple[str, dict] | None) -> str:
    """A LoRA serves on its model's base: refuse one trained on another architecture (header widths)."""
    if base is None:
        family = info.family or given
        if not family:
            raise LayoutError(f"{name}: no base of this model is published to check the LoRA against; publish the "
                              "base first or pass --family")
        return _check_family(given, family, name)
    base_family, shapes = base
    width = base_context_width(shapes)
    if ("te2" in info.parts) != (base_family == "sdxl") and info.parts - {"unet"}:
        raise LayoutError(f"{name} is a LoRA for {'SDXL' if 'te2' in info.parts else 'a one-text-encoder model'}, "
                          f"but this model's base is {FAMILY_NAMES.get(base_family, base_family)}; publish it under a "
                          "model with a matching base")
    if info.context_width and width and info.context_width != width:
        arch = FAMILY_NAMES.get(info.family or "", f"a {info.context_width}-wide text embedding")
        raise LayoutError(f"{name} is a LoRA for {arch}, but this model's base reads a {width}-wide text embedding "
                          f"({FAMILY_NAMES.get(base_family, base_family)}); publish it under a model with a matching base")
    if info.family and info.family != base_family:
        raise LayoutError(f"{name} is a LoRA for {FAMILY_NAMES[info.family]}, but this model's base is "
                          f"{FAMILY_NAMES.get(base_family, base_family)}")
    return _check_family(given, base_family, name)


def plan_lora_file(path: Path, given: str | None, base: tuple[str, dict] | None, peft_config: Path | None = None,
                   skipped: list[str] | None = None) -> VersionPlan:
    tensors = read_header(path)
    info = lora_info(tensors, peft_folder=peft_config is not None)
    if info is None:
        raise LayoutError(f"{path.name} holds no LoRA weights (no lora_unet_/lora_te*/lora_A/lora_down keys); "
                          "publish a base as component 'base'")
    family = _lora_family(info, path.name, given, base)
    plan = VersionPlan("lora", family, "lora", skipped=list(skipped or ()))
    plan.files[path.name] = path
    plan.precision[path.name] = precision(tensors)
    plan.meta.update(lora_format=info.format, weight_name=path.name, lora_parts=sorted(info.parts), rank=info.rank)
    if peft_config is not None:
        plan.files[PEFT_CONFIG] = peft_config
    return plan


def _config_files(config: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(config.rglob("*")):
        rel = p.relative_to(config).as_posix()
        if p.is_file() and p.suffix in (".json", ".txt") and ".safetensors.index" not in rel:
            out[f"{CONFIG_FOLDER}/{rel}"] = p
    if f"{CONFIG_FOLDER}/model_index.json" not in out:
        raise LayoutError(f"--config {config} has no model_index.json: give a diffusers folder (weights not needed)")
    return out


def plan_single_file(path: Path, given: str | None, config: Path | None) -> VersionPlan:
    tensors = read_header(path)
    if lora_info(tensors) is not None:
        raise LayoutError(f"{path.name} is a LoRA, not a base; publish it as component 'lora'")
    family = single_file_family(tensors)
    if family is None:
        raise LayoutError(f"{path.name}: unknown layout (not an SD 1.x/2.x/SDXL single-file checkpoint, not a LoRA); "
                          "publish a diffusers folder instead")
    family = _check_family(given, family, f"{path.name}, a single-file checkpoint")
    plan = VersionPlan("base", family, "single-file")
    plan.files[path.name] = path
    plan.precision[path.name] = precision(tensors)
    plan.meta.update(checkpoint=path.name)
    plan.notes.append(f"converted at publish: {path.name} → a diffusers folder (diffusers' from_single_file), "
                      "uploaded in its place; the manifest keeps the file's name and sha256")
    if config is None:
        _standard_config(plan, tensors)
        return plan
    plan.files.update(_config_files(config))
    return plan


def _standard_config(plan: VersionPlan, tensors: dict[str, Any]) -> None:
    """The family's packaged config, when the checkpoint has the standard dimensions; else one line asking for one."""
    import tempfile

    from . import standard

    name = FAMILY_NAMES[plan.family]
    why = standard.mismatch(plan.family, tensors)
    if why is not None:
        raise LayoutError(f"{plan.meta['checkpoint']} is not a standard {name} model ({why}); pass --config DIR, "
                          "a diffusers folder of its configs and tokenizers (weights not needed)")
    plan.workdir = tempfile.TemporaryDirectory(prefix="warmfleet-config-")
    folder = standard.write_config(plan.family, Path(plan.workdir.name) / CONFIG_FOLDER)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            plan.generated[f"{CONFIG_FOLDER}/{p.relative_to(folder).as_posix()}"] = p
    plan.meta.update(config="standard")
    plan.notes.append(f"config: the standard {name} config shipped with warmfleet"
                      + (f" ({standard.NOTES[plan.family]})" if plan.family in standard.NOTES else ""))


def _walk(root: Path) -> tuple[dict[str, Path], list[str]]:
    """The files worth uploading, and the clutter skipped; a pickle with no safetensors beside it is refused."""
    keep: dict[str, Path] = {}
    skipped: list[str] = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") and part not in CLUTTER_NAMES
                                  for part in p.relative_to(root).parts):
            continue
        rel = p.relative_to(root).as_posix()
        if p.suffix in PICKLED_SUFFIXES:
            if not any(p.parent.glob("*.safetensors")):
                _refuse_pickle(p)
            skipped.append(rel)
        elif p.name in CLUTTER_NAMES or p.suffix.lower() in CLUTTER_SUFFIXES or p.suffix not in (
                ".safetensors", ".json", ".txt"):
            skipped.append(rel)
        else:
            keep[rel] = p
    return keep, skipped


def plan_folder(root: Path, component: str, given: str | None, config: Path | None,
                base: tuple[str, dict] | None) -> VersionPlan:
    files, skipped = _walk(root)
    if component == "lora":
        if PEFT_WEIGHTS in files and PEFT_CONFIG in files:
            skipped += [rel for rel in files if rel not in (PEFT_WEIGHTS, PEFT_CONFIG)]
            return plan_lora_file(files[PEFT_WEIGHTS], given, base, peft_config=files[PEFT_CONFIG], skipped=skipped)
        weights = [rel for rel in files if rel.endswith(".safetensors")]
        if len(weights) != 1:
            raise LayoutError(f"{root.name} holds {len(weights)} .safetensors files; a LoRA version is one file "
                              "(give the file itself) or a PEFT folder (adapter_model.safetensors + adapter_config.json)")
        plan = plan_lora_file(files[weights[0]], given, base, skipped=skipped)
        plan.files.update({rel: p for rel, p in files.items() if rel.endswith(".json")})
        return plan
    family = folder_family(root)
    if family is None:
        top = [rel for rel in files if "/" not in rel and rel.endswith(".safetensors")]
        if len(top) == 1:  # a single-file checkpoint in a folder, with or without its own config/ beside it
            own = root / CONFIG_FOLDER if (root / CONFIG_FOLDER / "model_index.json").is_file() else None
            plan = plan_single_file(files[top[0]], given, config or own)
            plan.skipped = skipped + [rel for rel in files if rel not in plan.files and not rel.startswith(CONFIG_FOLDER)]
            return plan
        raise LayoutError(f"{root.name}: unknown layout (no model_index.json, not one single-file checkpoint); "
                          "give a diffusers folder, a .safetensors checkpoint or a LoRA file")
    family = _check_family(given, family, root.name)
    if family == "sdxl-refiner":
        raise LayoutError(f"{root.name} is an SDXL refiner (image-to-image only); this fleet serves text-to-image bases")
    plan = VersionPlan("base", family, "wuerstchen" if family == "wuerstchen" else "diffusers", skipped=skipped)
    for rel, p in files.items():
        plan.files[rel] = p
        if rel.endswith(".safetensors"):
            plan.precision[rel] = precision(read_header(p))
    if not any(rel.endswith(".safetensors") for rel in plan.files):
        raise LayoutError(f"{root.name} holds no .safetensors weights; convert the model to safetensors first")
    variants = sorted({v for rel in plan.files if is_weights(rel) and (v := variant_of(rel))})
    plan.meta.update(variants=variants, plain_weights=any(is_weights(r) and not variant_of(r) for r in plan.files))
    return plan


def plan_version(path: Path, component: str, family: str | None = None, config: Path | None = None,
                 base: tuple[str, dict] | None = None) -> VersionPlan:
    """What publishing `path` as `component` uploads and records; `base` is (family, tensor shapes) of the model's
    newest published base, against which a LoRA is checked."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLED_SUFFIXES:
            _refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise LayoutError(f"{path.name}: unknown layout; give a .safetensors file or a model folder")
        plan = plan_lora_file(path, family, base) if component == "lora" else plan_single_file(path, family, config)
    else:
        plan = plan_folder(path, component, family, config, base)
    if plan.component != component:
        raise LayoutError(f"{path.name} is a {plan.component}, not a {component}")
    plan.meta.update(family=plan.family, layout=plan.layout, layout_version=LAYOUT_VERSION, precision=plan.precision)
    return plan
