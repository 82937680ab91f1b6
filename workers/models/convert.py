"""A single-file checkpoint converted once, at publish, into the diffusers folder that is published in its place.

The conversion is diffusers' own and public: `Pipeline.from_single_file(<file>, config=<config folder>,
local_files_only=True, dtype=<the file's dtype>)`, then `save_pretrained(<folder>, safe_serialization=True)`. The
config folder is exactly what a single-file version used to publish as `config/` (the user's `--config DIR` or the
family's standard one, workers/models/standard.py). The version's manifest meta keeps `layout: single-file` and,
under `converted_from`, the original file's name, size, sha256 and precision, and which diffusers converted it: a
worker loads the folder with `from_pretrained` like any other (workers/models/single_file.py), and `warmfleet
versions` / an operator reading the manifest still sees where it came from.

Converting in the file's own dtype (fp16 stays fp16) keeps every value: a worker that computes in another dtype casts
the saved tensors exactly as `from_single_file` would have cast the file's. A file mixing float dtypes converts in
float32, which holds fp16, bf16 and fp32 values exactly.

Memory: the whole pipeline is held in memory while it converts and saves, as `from_single_file` builds it — for the
reference SDXL file (6.9 GB fp16) about 7 GB of converted modules, plus what diffusers holds of the checkpoint while it
converts. The publishing machine needs that much; workers never do this.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .detect import FLOAT_DTYPES, PICKLED_SUFFIXES, LayoutError, precision, read_header
from .layouts import CONFIG_FOLDER, VersionPlan

TORCH_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def checkpoint_dtype(tensors: dict[str, Any]) -> str:
    """The torch dtype a checkpoint's float weights are stored in; float32 for a file that mixes several."""
    found = {t.dtype for t in tensors.values() if t.dtype in FLOAT_DTYPES}
    if len(found) == 1:
        return TORCH_NAMES[found.pop()]
    return "float64" if "F64" in found else "float32"


def _config_folder(plan: VersionPlan, into: Path) -> Path:
    """The plan's `config/` files (and nothing else of the user's folder) copied under `into`."""
    for rel, src in {**plan.files, **plan.generated}.items():
        if rel.startswith(CONFIG_FOLDER + "/"):
            dest = into / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
    return into / CONFIG_FOLDER


def convert_single_file(plan: VersionPlan, into: Path) -> VersionPlan:
    """The plan of the diffusers folder that `plan` (a checked single-file base) converts to, saved under `into`.

    `into` must not exist yet; a conversion diffusers refuses is one LayoutError line, and nothing is uploaded."""
    import diffusers
    import torch

    from cachemgr.manifest import sha256_file

    from .base import LoadError
    from .single_file import pipeline_class
    from .skeleton import check_diffusers

    if plan.layout != "single-file":
        raise ValueError(f"only a single-file plan converts, not a {plan.layout} one")
    name = str(plan.meta["checkpoint"])
    checkpoint = plan.files[name]
    tensors = read_header(checkpoint)
    dtype = checkpoint_dtype(tensors)
    work = into.with_name(into.name + "-source")
    try:
        config = _config_folder(plan, work)
        try:
            cls = pipeline_class(config)
        except LoadError as exc:
            raise LayoutError(str(exc)) from None
        try:
            pipe = cls.from_single_file(str(checkpoint), config=str(config), local_files_only=True,
                                        dtype=getattr(torch, dtype))
            pipe.save_pretrained(str(into), safe_serialization=True)
        except Exception as exc:
            reason = " ".join(str(exc).split())[:300]
            raise LayoutError(f"{name}: diffusers could not convert it ({type(exc).__name__}: {reason}); pass "
                              "--config DIR with the configs it was trained with") from exc
        del pipe
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = VersionPlan("base", plan.family, "single-file", skipped=list(plan.skipped))
    for path in sorted(p for p in into.rglob("*") if p.is_file()):
        rel = path.relative_to(into).as_posix()
        if path.suffix in PICKLED_SUFFIXES:
            raise LayoutError(f"diffusers saved {rel}, a pickle, converting {name}; nothing was uploaded")
        out.files[rel] = path
        if rel.endswith(".safetensors"):
            out.precision[rel] = precision(read_header(path))
    check_diffusers(out)  # the saved folder holds every weight its configs ask for
    converted_from = {"file": name, "size": checkpoint.stat().st_size, "sha256": sha256_file(checkpoint),
                      "precision": plan.precision.get(name, precision(tensors)), "dtype": dtype,
                      "layout": "single-file", "by": f"diffusers {diffusers.__version__} from_single_file"}
    meta = {k: v for k, v in plan.meta.items() if k not in ("checkpoint", "precision")}
    meta.update(precision=out.precision, variants=[], plain_weights=True, converted_from=converted_from)
    out.meta = meta
    out.notes = [line for line in plan.notes if not line.startswith("converted at publish")]
    out.notes.append(f"converted from {name} ({converted_from['size']} bytes, {converted_from['precision']}, sha256 "
                     f"{converted_from['sha256'][:16]}…) by diffusers {diffusers.__version__}")
    return out
