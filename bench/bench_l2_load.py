"""L2 → L1: loading a release from the node's disk vs a raw sequential read of the same bytes, in one run.

    python bench/bench_l2_load.py [--size tiny|large|xl] [--repeats N] [--profile] [--source DIR]

The release is synced into a temp L2 once. The raw baseline reads exactly the files a build opens: traced once
with strace in a child process doing the same build (without strace: the release's snapshot files and
manifests), each file once, in 1 MiB blocks. Every step runs once before timing, so the page cache is warm for
all of them, as on a node whose L2 was just synced (dropping caches is not possible here). Then, alternating,
with the garbage of the previous step collected before each one starts:
- build: `StableDiffusionXL.builder(...).with_cache(L2).build()` — the worker's whole L1 load: configs,
  module construction, safetensors tensors, LoRA adapter, to the device. On CPU the weights stay mapped from
  L2 (safetensors mmap): pages are read when first used, not by the build;
- diffusers: what any diffusers user pays for the same folders, with none of our code: `from_pretrained` on the
  base snapshot, `load_lora_weights` on the LoRA's (the build's floor, unless diffusers itself gets faster);
- build + resident: the build, then one element of every 4 KiB page of every parameter and buffer touched, so
  every weight byte is in memory — what an upload to a GPU forces; this one reads the same bytes as raw;
- tensors: only the release's safetensors files opened as tensors (`safetensors.torch.load_file`, mmap: maps
  the file, reads the header);
- tensors + resident: the same, then every page touched — the byte-moving floor of any load;
- raw: the sequential read.
Target: load ≤ 1.3× raw. `--size large` measures a ~0.6 GB SDXL-shaped release (fleetctl/demo/builders.py), where bytes
rather than fixed costs could dominate; its results are named `*_large` and written to their own section.
`--size xl --source DIR` measures a full-size SDXL release: DIR holds `base-v1/` (the 6.9 GB fp16 single file in the
real SGM key layout) and `lora-v1/` (a ~1.2 GB kohya LoRA on the UNet and both text encoders), as
`python -m bench reference --cache C` leaves them in C/release (bench/_reference_data.py). They are published as
`warmfleet publish` does (single-file layout + the packaged standard config) and synced into L2, and the build keeps
the checkpoint's float16 (as a GPU worker would); the plain-diffusers row is left out there (`from_single_file`
copies the whole checkpoint into process memory: 6.9 GB more on a shared 24 GB machine). Results `*_xl`.
"""

from __future__ import annotations

import argparse
import gc
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _fleet import SIZES, median, publish_release  # noqa: E402
from _results import entry, merge_results, stamp, verdict, write_section  # noqa: E402

TARGET = 1.3
BUILD_TARGET = {"large": 2.0, "xl": 2.0}
"""The performance issue's target for the whole build at full and large size (the table keeps the 1.3 floor too)."""
PAGE = 4096
DEFAULT_REPEATS = {"tiny": 7, "large": 9, "xl": 3}
XL_MODEL = "sdxl-xl"
XL_RELEASE = f"{XL_MODEL}@base-v1+lora-v1"
TRACE_BUILD = """
import sys
from pathlib import Path
sys.path[:0] = [sys.argv[1]]
from cachemgr import Cache
from cachemgr import Release
from workers.models import builder_for, family_of
cache = Cache.at(Path(sys.argv[2]))
family = builder_for(family_of(cache.store, Release.parse(sys.argv[4])))
family.builder(sys.argv[3], sys.argv[4]).with_cache(cache).on("cpu", sys.argv[5] or None).build()
"""


def files_opened_by_build(root: Path, model: str, release: str, dtype: str | None) -> list[Path] | None:
    """Every regular file under `root` that a build of `release` opens, each path once, in the order first
    opened; traced with strace in a child process. None when strace is missing."""
    if not shutil.which("strace"):
        return None
    with tempfile.TemporaryDirectory(prefix="bench-l2-trace-") as tmp:
        trace = Path(tmp) / "trace"
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(trace), sys.executable, "-c",
                        TRACE_BUILD, str(HERE.parent), str(root), model, release, dtype or ""],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        text = trace.read_text()
    opened: dict[Path, None] = {}
    for name in re.findall(r'open(?:at)?\([^"]*"([^"]+)"', text):
        path = Path(name)
        if path.is_relative_to(root) and path.is_file():
            opened.setdefault(path)
    return list(opened)


def publish_xl(archive, source: Path) -> None:
    """The full-size release as `warmfleet publish` takes it: planned from the files (single-file layout, the
    packaged standard SDXL config), checked to boot, staged (links, no copy) and published."""
    from cachemgr.names import ComponentRef
    from fleetctl.cli.main import _published_base
    from workers.models.layouts import plan_version
    from workers.models.skeleton import check_boots

    for component, folder in (("base", "base-v1"), ("lora", "lora-v1")):
        base = _published_base(archive, XL_MODEL) if component == "lora" else None
        plan = plan_version(source / folder, component, None, None, base)
        check_boots(plan)
        with tempfile.TemporaryDirectory(prefix="bench-l2-stage-") as stage:
            archive.publish(ComponentRef(XL_MODEL, component, "v1"), plan.stage(Path(stage)), meta=plan.meta)


def touch_pages(tensors) -> None:
    """Read one element of every page of every tensor: weights mapped from L2 become resident."""
    import torch

    with torch.no_grad():
        for tensor in tensors:
            if tensor.numel():
                tensor.detach().reshape(-1)[:: max(1, PAGE // tensor.element_size())].sum()


def pipeline_tensors(resident) -> list:
    import torch

    modules = [c for c in resident.pipeline.components.values() if isinstance(c, torch.nn.Module)]
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


PROFILE_PHASES = [
    ("whole build", "workers/models/base.py", "build"),
    ("L2 checks (ensure_local)", "workers/models/base.py", "ensure_local"),
    ("manifests parsed", "cachemgr/manifest.py", "from_json"),
    ("base: mapped build (diffusers folder)", "workers/models/mapped.py", "build_pipeline"),
    ("· modules built from configs, every tensor on meta (diffusers)", "diffusers/configuration_utils.py",
     "from_config"),
    ("· · checked to hold parameters only (mapped._all_weights)", "workers/models/mapped.py", "_all_weights"),
    ("· modules built from configs, empty weights (transformers CLIP)", "transformers/modeling_utils.py",
     "post_init"),
    ("· safetensors mapped (layout from the manifest, one private mapping per file)", "workers/models/mapped.py",
     "map_file"),
    ("· tensors assigned (load_state_dict assign=True)", "workers/models/mapped.py", "_assign"),
    ("· tokenizers, scheduler", "transformers/tokenization_utils_base.py", "from_pretrained"),
    ("base: from_single_file (single-file layout)", "diffusers/loaders/single_file.py", "from_single_file"),
    ("· SGM → diffusers key conversion (UNet)", "diffusers/loaders/single_file_utils.py",
     "convert_ldm_unet_checkpoint"),
    ("· tensors into modules (diffusers load_model_dict_into_meta)", "diffusers/models/model_loading_utils.py",
     "load_model_dict_into_meta"),
    ("· text encoders (diffusers CLIP from LDM)", "diffusers/loaders/single_file_utils.py",
     "create_diffusers_clip_model_from_ldm"),
    ("LoRA (load_lora)", "workers/models/base.py", "load_lora"),
    ("· LoRA file read + kohya → diffusers keys (lora_state_dict)", "diffusers/loaders/lora_pipeline.py",
     "lora_state_dict"),
    ("· UNet LoRA layers injected at their modules (mapped.inject_lora)", "workers/models/mapped.py", "inject_lora"),
    ("· · LoRA layers made by peft (the first, and the two the copies are checked against)",
     "peft/tuners/lora/model.py", "_create_new_module"),
    ("· · LoRA layers copied from peft's first (mapped._LinearCloner._copy)", "workers/models/mapped.py", "_copy"),
    ("· text-encoder LoRA (diffusers load_lora_into_text_encoder)", "diffusers/loaders/lora_pipeline.py",
     "load_lora_into_text_encoder"),
    ("adapter activated (resident.set_adapters: the LoRA layers only)", "workers/resident.py", "set_adapters"),
    ("resident bytes counted (gpu.resident_bytes)", "workers/gpu.py", "resident_bytes"),
    ("pipe.to(device)", "diffusers/pipelines/pipeline_utils.py", "to"),
    ("pages touched (resident)", "bench_l2_load.py", "touch_pages"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=[*sorted(SIZES), "xl"], default="tiny",
                        help="tiny: the 7 MB demo release (default); large: a ~0.6 GB SDXL-shaped one; xl: a "
                             "full-size SDXL single file + kohya LoRA from --source")
    parser.add_argument("--source", type=Path, default=None,
                        help="xl only: the folder holding base-v1/ and lora-v1/ (`python -m bench reference "
                             "--cache C` leaves them in C/release)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 7 tiny, 9 large, 3 xl)")
    parser.add_argument("--profile", action="store_true",
                        help="one more build + resident under cProfile: where the time goes, added to the section")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    xl = args.size == "xl"
    if xl and (args.source is None or not (args.source / "base-v1").is_dir() or not (args.source / "lora-v1").is_dir()):
        sys.exit("--size xl needs --source DIR holding base-v1/ and lora-v1/ (run `python -m bench reference "
                 "--cache C` and pass C/release)")
    size = SIZES["large"] if xl else SIZES[args.size]
    model, release_text, sfx = (XL_MODEL, XL_RELEASE, "_xl") if xl else (size.model, size.release, size.suffix)
    dtype = "float16" if xl else None  # xl: the checkpoint's own dtype, as a GPU worker keeps it
    repeats = args.repeats or DEFAULT_REPEATS[args.size]

    import torch
    from diffusers import StableDiffusionXLPipeline

    from cachemgr import Cache, LocalArchive, Release
    from cachemgr.names import ComponentRef
    from cachemgr.store import forget_manifests
    from cachemgr.sync import sync_release
    from workers.models import builder_for, family_of
    from workers.models.base import LORA_WEIGHT_NAME
    from workers.models.mapped import install_plain_setattr, map_file

    torch.set_num_threads(1)
    install_plain_setattr()  # as a worker process does at boot (workers/boot.py); the diffusers row runs with it too
    release = Release.parse(release_text)
    times: dict[str, list[float]] = {
        name: [] for name in ("build", "diffusers", "resident", "tensors", "tensors_resident", "raw")
    }
    profile_md = ""
    with tempfile.TemporaryDirectory(prefix="bench-l2-") as tmp:
        tmp_path = Path(tmp)
        archive = LocalArchive(tmp_path / "archive")
        if xl:
            publish_xl(archive, args.source)
        else:
            publish_release(archive, tmp_path / "build", size=args.size)
        cache = Cache.at(tmp_path / "l2")
        sync_release(archive, cache.store, release)
        shutil.rmtree(tmp_path / "archive")  # only L2 is read from here on (xl: 8 GB less on disk)
        builder = builder_for(family_of(cache.store, release))
        traced = files_opened_by_build(cache.root, model, release_text, dtype)
        if traced is not None:
            files, how = traced, "traced with strace: the files a build opens, each once"
        else:
            files = [cache.store.manifest_path(ref) for ref in release.refs()]
            files += [p for ref in release.refs() for p in sorted(cache.store.path(ref).rglob("*")) if p.is_file()]
            how = "strace missing: the release's manifests and snapshot files"
        weights = [p for p in files if p.suffix == ".safetensors"]
        total = sum(p.stat().st_size for p in files)
        weight_bytes = sum(p.stat().st_size for p in weights)

        def load() -> object:
            forget_manifests()  # each build parses its manifests, as a worker's first build of a release does
            return builder.builder(model, release_text).with_cache(cache).on("cpu", dtype).build()

        def build() -> float:
            started = time.perf_counter()
            loaded = load()
            elapsed = time.perf_counter() - started
            del loaded  # freed after the clock stops, as in the diffusers step: freeing ~20k objects is not loading
            return elapsed

        def diffusers() -> float:
            started = time.perf_counter()
            pipe = StableDiffusionXLPipeline.from_pretrained(cache.store.path(release.base), local_files_only=True,
                                                             use_safetensors=True)
            for component, version in release.components[1:]:
                pipe.load_lora_weights(str(cache.store.path(ComponentRef(release.model, component, version))),
                                       weight_name=LORA_WEIGHT_NAME, adapter_name="lora", local_files_only=True)
            return time.perf_counter() - started

        def resident() -> float:
            started = time.perf_counter()
            loaded = load()
            touch_pages(pipeline_tensors(loaded))
            elapsed = time.perf_counter() - started
            del loaded
            return elapsed

        def tensors() -> float:
            started = time.perf_counter()
            for path in weights:
                map_file(path)  # reads the header and maps the file; pages are read when first used
            return time.perf_counter() - started

        def tensors_resident() -> float:
            started = time.perf_counter()
            for path in weights:
                touch_pages(map_file(path).values())
            return time.perf_counter() - started

        def raw() -> float:
            started = time.perf_counter()
            for path in files:
                with open(path, "rb", buffering=0) as fh:
                    while fh.read(1 << 20):
                        pass
            return time.perf_counter() - started

        steps = {"build": build, "diffusers": diffusers, "resident": resident, "tensors": tensors,
                 "tensors_resident": tensors_resident, "raw": raw}
        if xl:  # from_single_file + load_lora_weights would hold a 6.9 GB copy of the checkpoint: see the docstring
            del steps["diffusers"], times["diffusers"]
        for run in steps.values():  # warm-up: imports and the page cache, the same for every step
            run()
        for rep in range(repeats):
            for name in (list(steps) if rep % 2 == 0 else list(reversed(steps))):
                gc.collect()  # the previous step's pipeline: collected here, not inside the next step's timing
                times[name].append(steps[name]())
        if args.profile:
            from _profile import dump, profiled, report

            gc.collect()
            started = time.perf_counter()
            stats = profiled(resident)
            wall = time.perf_counter() - started
            print(dump(stats))
            profile_md = report("Where a build + resident goes", stats, PROFILE_PHASES, wall)
            print(profile_md)

    def ratio(step: str) -> float:
        return median([s / r for s, r in zip(times[step], times["raw"], strict=True)])

    ratios = {step: ratio(step) for step in times if step != "raw"}
    ms = {k: median(v) * 1000 for k, v in times.items()}
    mb = total / 1e6

    def mbps(step: str) -> float:
        return mb / (ms[step] / 1000)

    print(f"{len(files)} files, {mb:.1f} MB ({how}): " + ", ".join(
        f"{k} {ms[k]:.1f} ms ({mbps(k):.0f} MB/s)" for k in times) + "; " + ", ".join(
        f"{k}/raw {v:.2f}x ({verdict(v <= TARGET)})" for k, v in ratios.items()))
    if args.no_write:
        return
    build_target = BUILD_TARGET.get(args.size, TARGET)
    plain = [entry(f"l2_load.diffusers_over_raw_read{sfx}", round(ratios["diffusers"], 2), "ratio"),
             entry(f"l2_load.diffusers_ms{sfx}", round(ms["diffusers"], 1), "ms")] if "diffusers" in ratios else []
    merge_results([
        *plain,
        entry(f"l2_load.build_over_raw_read{sfx}", round(ratios["build"], 2), "ratio", f"<= {build_target}"),
        entry(f"l2_load.resident_over_raw_read{sfx}", round(ratios["resident"], 2), "ratio", f"<= {TARGET}"),
        entry(f"l2_load.tensors_over_raw_read{sfx}", round(ratios["tensors"], 3), "ratio", f"<= {TARGET}"),
        entry(f"l2_load.tensors_resident_over_raw_read{sfx}", round(ratios["tensors_resident"], 3), "ratio"),
        entry(f"l2_load.build_ms{sfx}", round(ms["build"], 1), "ms"),
        entry(f"l2_load.resident_ms{sfx}", round(ms["resident"], 1), "ms"),
        entry(f"l2_load.raw_read_ms{sfx}", round(ms["raw"], 2), "ms"),
        entry(f"l2_load.read_mb{sfx}", round(mb, 1), "MB"),
        entry(f"l2_load.raw_read_mb_per_s{sfx}", round(mbps("raw")), "MB/s"),
        entry(f"l2_load.resident_mb_per_s{sfx}", round(mbps("resident")), "MB/s"),
    ])
    rows = [
        ("raw sequential read, 1 MiB blocks", "raw"),
        ("safetensors → tensors (`mapped.map_file`: header + one mapping per file)", "tensors"),
        ("safetensors → tensors, every page touched", "tensors_resident"),
        ("plain diffusers on the same folders: `from_pretrained` + `load_lora_weights`", "diffusers"),
        ("whole L1 build (configs, modules, tensors, LoRA, `.to(device)`)", "build"),
        ("whole L1 build, then every weight page touched", "resident"),
    ]
    def cell(step: str) -> str:
        if step == "raw":
            return "1"
        if step in ("diffusers", "tensors_resident"):  # not loads of ours: floors to compare against
            return f"{ratios[step]:.2f}×"
        verdicts = verdict(ratios[step] <= TARGET)
        if step == "build" and build_target != TARGET:
            verdicts += f"; issue target ≤ {build_target}: {verdict(ratios[step] <= build_target)}"
        return f"**{ratios[step]:.2f}×** ({verdicts})"

    table = "\n".join(f"| {label} | {ms[step]:.1f} ms | {mbps(step):.0f} MB/s | {cell(step)} |"
                      for label, step in rows if step in ratios or step == "raw")
    title = "L2 → L1 load vs a raw read of the same bytes" + (f" — {args.size} model" if sfx else "")
    note = {"tiny": TINY_NOTE, "large": LARGE_NOTE, "xl": XL_NOTE}[args.size].format(
        raw_ms=ms["raw"], raw_gbps=mb / ms["raw"], build_over_issue=ms["build"] / 124.0)
    write_section(f"l2_load{sfx}", f"""
## {title} (`bench/bench_l2_load.py{' --size ' + args.size if sfx else ''}`)

{stamp()} · CPU, 1 torch thread, {dtype or 'float32'}, warm page cache for every step (each run once before timing)

`{release_text}`: the build opens {len(files)} files, {mb:.1f} MB ({len(weights)} safetensors, {weight_bytes / 1e6:.1f}
MB; {how}).
{repeats} alternating rounds; ratios = median of per-round ratios; MB/s = those {mb:.1f} MB ÷ the
median time.

| | median | MB/s | ÷ raw read (target ≤ {TARGET}) |
|---|---|---|---|
{table}

{note}

{profile_md}
""")


TINY_NOTE = """The whole build of a 7 MB model is dominated by fixed costs that do not grow with the model (building
~100 modules from configs, tokenizers, LoRA layers); `python bench/bench_l2_load.py --size large` measures a ~0.6 GB
release, where they weigh less. `map_file` maps the file (one private mapping, tensors are views of it), so the plain
`tensors` row reads only headers; the `every page touched` rows read every weight byte."""

MAPPED = """How the build loads (workers/models/mapped.py): each module of the diffusers folder is built from its config
with every tensor on the meta device (torch's initialisers skipped; accelerate's way, which keeps buffers real,
for a model that has any), and its tensors are views of one private, copy-on-write mapping of each safetensors
file in L2, cut where the version's manifest says (the layout recorded from the header at publish, so no header
is parsed again), set straight into each module's parameters: on CPU no weight byte is copied
(`safetensors.torch.load_file` copies every tensor out of its mapping: ~50 ms per 0.5 GB in safetensors 0.8, a
whole extra pass), on a GPU the pipeline's `.to(device)` is the one host → device copy. A LoRA's layers are peft's
own classes, at exactly the modules its keys name: peft makes the first; the rest are copies of it with what
depends on the target changed (base layer, feature counts, rank, alpha, scaling, the file's tensors), each build
checking a copy against the layer peft makes for the same target, attribute by attribute, before using any
(peft's constructor costs ~0.3 ms a layer; a copy ~45 µs). The adapter is registered as peft registers it, so
`set_adapters`, `delete_adapters`, `disable_lora` work unchanged; a switch walks only the LoRA layers
(workers/resident.py `set_adapters`). A build that succeeds ends with `gc.freeze()` (mapped.py `gc_paused`): the
young-generation pass the first allocation after it would start over the ~20,000 containers it made (~4 ms here)
never happens, nor do later full passes over the model. Whatever the mapped path does not cover (other key
layouts, DoRA, LoRA biases, …) goes to `from_pretrained` / `load_lora_weights`. tests/test_mapped_load.py: the same
tensors, dtypes, LoRA layers (every attribute), adapter bookkeeping and image bytes as plain diffusers for the same
seed."""

LARGE_NOTE = MAPPED + """

On CPU the build leaves the weights mapped from L2: it reads the configs, the manifests and whatever pages module
loading touches; the first image reads the rest. The `every page touched` rows make all weight bytes resident, as
a GPU upload would, and so read the same bytes as the raw read. No step of the build moves weight bytes; what
bounds it now is Python object construction, measured apart on this host (medians of 10 builds, the build
following a 592 MB read as in the table): the UNet and VAE built from their configs ~22 ms (644 modules,
4,670 `nn.Module.__setattr__`, each through torch's Parameter/Buffer metaclass checks; the same count whatever
the widths), the two CLIP encoders with their configs ~6 ms, tokenizers and
scheduler ~4 ms, the tensors mapped and set ~6.5 ms (a `Parameter` per tensor), the LoRA ~8 ms (96 layers: 3 made
by peft, 93 copies, the base frozen), the manifests parsed ~4 ms (base and LoRA, a range and hash per tensor and
piece: the bench drops parsed manifests before each build, as a worker's first build parses them), the resident
bytes counted ~2.5 ms and the adapter activated ~2 ms. The same build back to back, with the CPU caches warm,
takes ~10 % less: each step before it here streams hundreds of MB through them. Before this round of changes the
build took ~95–125 ms (peft made every LoRA layer; walks through `named_modules()`; a gen-0 collection after each
build; a parameter allocated on the host and moved to meta per tensor). The raw read it is divided by is a memory
copy out of the page cache, whose speed depends on the host: 124 ms (4.8 GB/s) when the issue was written, ~30 ms
(~20 GB/s) on the host of the first run on 2026-11-29 (build ÷ raw 1.89), {raw_ms:.0f} ms ({raw_gbps:.0f} GB/s) in this
run. The build moves no weight byte, so its time does not follow the copy's: against a read at the issue's speed it
is {build_over_issue:.2f}×, and on a host whose page cache copies at ~28 GB/s it is over 2× (the large target is
missed there: what remains is the object construction above, ~49 ms). The `diffusers` row (plain
`from_pretrained` + `load_lora_weights` on the same folders) is the comparison that does not move with the host.
This process is set up as a worker's (`install_plain_setattr`: modules' plain attributes set without torch's
checks, for the process's life), so the build starts with warm attribute caches; the diffusers row gains from it
too. Scoped to each build instead (as `ModelBuilder.build` does in a process that did not install it), the build
is ~3 ms slower here."""

XL_NOTE = MAPPED + """

The base is a single file in the original (SGM) key layout, published as `warmfleet publish` publishes it: the
checkpoint as it is plus the packaged standard config (`config/`). The build runs diffusers' `from_single_file`
(key conversion to diffusers names, modules on the meta device, tensors put in with `load_model_dict_into_meta`)
on the checkpoint mapped from L2 instead of a copy (mapped.py `mapped_single_file`; diffusers' own
`load_single_file_checkpoint` calls `load_file`, which holds a 6.9 GB copy in process memory and makes a full extra
pass over the bytes), with transformers' initialisers skipped on the empty CLIP encoders, in the checkpoint's own
float16, and the open-CLIP encoder's attention q/k/v taken as views of each layer's `in_proj` (mapped.py
`open_clip_views`; diffusers clones all 192: ~315 MB read out of the mapping, 0.1–0.45 s depending on the page
cache, the largest and most variable part of the build before) — so no weight byte is copied or converted on
CPU; on a GPU, `.to(device)` is the one copy. The kohya LoRA (UNet + both text encoders, rank 324, 736 layers)
goes through the mapped LoRA path (3 layers per part made by peft, the rest copies). Measured apart on this host
(builds back to back and after an 8 GB read): ~0.6 s in all — `from_single_file` ~0.4 s (UNet/VAE/encoders built on
meta, `load_model_dict_into_meta` over ~2,500 tensors ~80 ms, the two CLIP tokenizers from vocab.json + merges.txt
~45 ms each), the LoRA ~0.1–0.13 s, the adapter activated ~20 ms (it was ~30 ms through peft's `set_adapter`),
resident bytes ~20 ms, L2 checks and manifests ~20 ms. A `tokenizer.json` written at publish would not help with
this transformers (5.x): loading the CLIP tokenizer from its tokenizer.json took 0.35–0.5 s against ~0.12 s from
vocab.json + merges.txt (the same ids; measured apart), so publish keeps writing only vocab.json + merges.txt. The
build took ~2.6 s of CPU before the mapped paths, ~1.0 s before this round (peft making each of the 736 LoRA layers,
the open-CLIP clones, a gen-0 collection after the build)."""

if __name__ == "__main__":
    main()
