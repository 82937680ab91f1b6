"""The mapped L1 build (workers/models/mapped.py) against plain diffusers on the same L2 folders.

The builder constructs modules with empty weights and assigns the safetensors tensors as they lie in L2, and injects
a LoRA's UNet layers itself; plain diffusers is `from_pretrained` + `load_lora_weights`. Both must leave the same
pipeline: the same tensors (names, dtypes, values, trainability), the same adapter bookkeeping, and for a seed the
same image bytes. The mapped path must really be the one taken: with diffusers' loaders made to fail, the demo
release still builds.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from cachemgr import Cache, LocalArchive, Release
from cachemgr.sync import sync_release
from fleetctl.demo.builders import DEMO_MODEL, SHARED_BASE_RELEASES, SINGLE_FILE_DEMO_RELEASE
from tasks.requests import GenerateRequest
from workers.models import SingleFile, StableDiffusionXL
from workers.models.base import LORA_WEIGHT_NAME, adapter_name
from workers.models.mapped import build_pipeline, plain_setattr

PREVIOUS, CURRENT = SHARED_BASE_RELEASES
MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Same thread count on both sides: what makes image bytes comparable."""


@pytest.fixture(scope="module")
def cache(demo_archive_dir, tmp_path_factory) -> Cache:
    cache = Cache.at(tmp_path_factory.mktemp("l2"))
    for text in (*SHARED_BASE_RELEASES, SINGLE_FILE_DEMO_RELEASE):
        sync_release(LocalArchive(demo_archive_dir), cache.store, Release.parse(text))
    return cache


def mapped(cache: Cache, dtype: str | None = None):
    """The builder's pipeline serving both releases (two adapters on one base), with diffusers' own loaders made
    to fail: whatever builds here was built by the mapped path."""
    from diffusers import StableDiffusionXLPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the mapped build fell back to diffusers' loader")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StableDiffusionXLPipeline, "from_pretrained", refuse)
        mp.setattr(StableDiffusionXLPipeline, "load_lora_weights", refuse)
        return StableDiffusionXL.builder(DEMO_MODEL, PREVIOUS).also_serving(CURRENT).with_cache(cache).on(
            "cpu", dtype).build()


def plain(cache: Cache, dtype: torch.dtype = torch.float32):
    """What any diffusers user gets for the same folders: `from_pretrained`, then one `load_lora_weights` per LoRA."""
    from diffusers import StableDiffusionXLPipeline

    base = Release.parse(PREVIOUS).base
    pipe = StableDiffusionXLPipeline.from_pretrained(str(cache.store.path(base)), local_files_only=True,
                                                     use_safetensors=True, dtype=dtype)
    for text in SHARED_BASE_RELEASES:
        lora = Release.parse(text).refs()[1]
        pipe.load_lora_weights(str(cache.store.path(lora)), weight_name=LORA_WEIGHT_NAME,
                               adapter_name=adapter_name(lora.version), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_adapters([adapter_name("v2.3.0")])  # the builder activates its first release's adapter
    return pipe


def assert_same_models(a, b) -> None:
    for name in MODELS:
        ma, mb = getattr(a, name), getattr(b, name)
        assert type(ma) is type(mb)
        sa, sb = ma.state_dict(), mb.state_dict()
        assert list(sa) == list(sb), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, (name, key)
            assert torch.equal(sa[key], sb[key]), (name, key)
        assert {k: p.requires_grad for k, p in ma.named_parameters()} == \
               {k: p.requires_grad for k, p in mb.named_parameters()}, name
        buffers_a, buffers_b = dict(ma.named_buffers()), dict(mb.named_buffers())
        assert list(buffers_a) == list(buffers_b) and all(torch.equal(buffers_a[k], buffers_b[k]) for k in buffers_a)
        assert ma.training == mb.training
    config_a, config_b = dict(a.config), dict(b.config)
    assert config_a == config_b, {k: (config_a.get(k), config_b.get(k)) for k in {*config_a, *config_b}
                                  if config_a.get(k) != config_b.get(k)}
    assert dict(a.unet.config) == dict(b.unet.config)
    assert a.text_encoder_2.config.to_dict() == b.text_encoder_2.config.to_dict()


def assert_same_module(a, b, path: str) -> None:
    """Two modules alike attribute by attribute, all the way down: class, every attribute's value, every tensor's
    class, dtype, shape, trainability and values."""
    assert type(a) is type(b), path
    assert set(a.__dict__) == set(b.__dict__), (path, set(a.__dict__) ^ set(b.__dict__))
    for key, x in a.__dict__.items():
        y = b.__dict__[key]
        if key == "_modules":
            assert list(x) == list(y), path
            for k in x:
                assert_same_module(x[k], y[k], f"{path}.{k}")
        elif key in ("_parameters", "_buffers"):
            assert list(x) == list(y), path
            for k, p in x.items():
                q = y[k]
                assert (p is None) == (q is None), (path, k)
                if p is not None:
                    assert type(p) is type(q) and p.dtype == q.dtype and p.requires_grad == q.requires_grad, (path, k)
                    assert torch.equal(p, q), (path, k)
        elif key == "kwargs":  # peft keeps the tied-adapter dict it was given: one per call there, per layer here
            assert x == y, path
        elif type(x).__eq__ is object.__eq__ and x is not y:  # e.g. an attention processor: alike, not the same
            assert type(x) is type(y) and getattr(x, "__dict__", None) == getattr(y, "__dict__", None), (path, key)
        else:
            assert x == y, (path, key, x, y)


def test_every_lora_layer_is_the_layer_peft_makes(cache):
    """The UNet's LoRA layers are mostly copies of the first one peft made (mapped._LinearCloner): each must equal,
    attribute by attribute, the layer diffusers' own loader makes at the same module."""
    from peft.tuners.lora import LoraLayer, LoraModel

    made = []
    create = LoraModel._create_new_module
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoraModel, "_create_new_module", staticmethod(lambda *a, **k: made.append(1) or create(*a, **k)))
        ours = mapped(cache).pipeline
    theirs = plain(cache)
    mine = {n: m for n, m in ours.unet.named_modules() if isinstance(m, LoraLayer)}
    yours = {n: m for n, m in theirs.unet.named_modules() if isinstance(m, LoraLayer)}
    assert list(mine) == list(yours) and len(mine) > 6
    assert len(made) <= 3, "the copies were not taken: peft made every layer"  # the second adapter: update_layer
    for name, layer in mine.items():
        assert_same_module(layer, yours[name], name)


def test_a_copy_that_differs_from_peft_s_layer_makes_peft_make_them_all(cache):
    """The check each build runs: when the copy of a layer is not what peft makes, no copy is used."""
    from peft.tuners.lora import LoraLayer, LoraModel

    from workers.models import mapped as mapped_module

    made = []
    create = LoraModel._create_new_module
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoraModel, "_create_new_module", staticmethod(lambda *a, **k: made.append(1) or create(*a, **k)))
        mp.setattr(mapped_module, "_same_layer", lambda *a: False)
        ours = mapped(cache).pipeline
    layers = [m for m in ours.unet.modules() if isinstance(m, LoraLayer)]
    assert len(made) == len(layers)  # every layer (the second adapter is added to them by peft's update_layer)
    assert_same_models(ours, plain(cache))


def test_the_mapped_build_holds_what_plain_diffusers_holds(cache):
    ours, theirs = mapped(cache).pipeline, plain(cache)
    assert_same_models(ours, theirs)
    assert ours.get_list_adapters() == theirs.get_list_adapters() == {"unet": ["lora_v2_3_0", "lora_v2_3_1"]}
    assert {k: c.to_dict() for k, c in ours.unet.peft_config.items()} == \
           {k: c.to_dict() for k, c in theirs.unet.peft_config.items()}
    lora = "lora_v2_3_1"  # a LoRA layer's scaling and active adapter, as peft set them
    layer = next(m for n, m in ours.unet.named_modules() if n.endswith("attn1.to_q"))
    twin = next(m for n, m in theirs.unet.named_modules() if n.endswith("attn1.to_q"))
    assert layer.scaling == twin.scaling and layer.r == twin.r and layer.lora_alpha == twin.lora_alpha
    assert set(layer.lora_A) == set(twin.lora_A) == {"lora_v2_3_0", lora}


def test_the_weights_stay_mapped_from_l2(cache):
    """No copy on CPU: a UNet parameter's storage is the file's bytes (it changes if the file is read into memory)."""
    from safetensors import safe_open

    pipe = mapped(cache).pipeline
    folder = cache.store.path(Release.parse(PREVIOUS).base) / "unet"
    name, param = next(iter(pipe.unet.state_dict().items()))
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor(name), param)
    assert param.untyped_storage().nbytes() > param.nbytes  # a view into the whole mapped file, not its own copy


def test_same_image_bytes_for_the_same_seed(cache):
    ours = mapped(cache)
    theirs = plain(cache)
    import dataclasses

    twin = dataclasses.replace(ours, pipeline=theirs, active=None, lora_disabled=False)
    for release, seed in ((CURRENT, 1), (PREVIOUS, 2), (CURRENT, 3)):
        request = GenerateRequest(prompt="Leather Jacket", seed=seed)
        assert ours.generate(request, release)[0] == twin.generate(request, release)[0], (release, seed)
    assert ours.generate(GenerateRequest(prompt="x", seed=1), CURRENT)[0] != \
           ours.generate(GenerateRequest(prompt="x", seed=1), PREVIOUS)[0]


def test_a_dtype_asked_converts_as_diffusers_converts(cache):
    """float16 from float32 files: the mapped build converts each tensor, as `from_pretrained(dtype=…)` does."""
    ours, theirs = mapped(cache, "float16").pipeline, plain(cache, torch.float16)
    assert ours.unet.dtype == torch.float16
    assert_same_models(ours, theirs)


def test_deleting_an_adapter_leaves_the_other_as_diffusers_leaves_it(cache):
    ours, theirs = mapped(cache).pipeline, plain(cache)
    for pipe in (ours, theirs):
        pipe.delete_adapters(["lora_v2_3_0"])
        pipe.set_adapters(["lora_v2_3_1"])
    assert ours.get_list_adapters() == theirs.get_list_adapters() == {"unet": ["lora_v2_3_1"]}
    assert_same_models(ours, theirs)


def test_a_folder_it_does_not_cover_is_left_to_from_pretrained(cache, tmp_path):
    """A weight the config does not name: the mapped builder declines (None) instead of loading half a model."""
    import shutil

    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(cache.store.path(Release.parse(PREVIOUS).base), tmp_path / "base")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(unet))
    tensors["conv_in.weight_renamed"] = tensors.pop("conv_in.weight")
    save_file(tensors, str(unet))
    assert build_pipeline(StableDiffusionXLPipeline, folder, torch.float32) is None


def test_a_single_file_base_is_converted_from_its_mapped_checkpoint(cache):
    """`from_single_file` on the checkpoint mapped from L2 (not copied into memory) converts to the same modules as
    on the checkpoint read by safetensors, and draws the same image."""
    import dataclasses

    from diffusers import StableDiffusionPipeline

    from workers.models.single_file import CONFIG_FOLDER, checkpoint_file

    ours = SingleFile.builder("pixel-single", SINGLE_FILE_DEMO_RELEASE).with_cache(cache).on("cpu").build()
    root = cache.store.path(Release.parse(SINGLE_FILE_DEMO_RELEASE).base)
    theirs = StableDiffusionPipeline.from_single_file(
        str(checkpoint_file(root, {})), config=str(root / CONFIG_FOLDER), local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(ours.pipeline, name).state_dict(), getattr(theirs, name).state_dict()
        assert list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    conv_in = ours.pipeline.unet.conv_in.weight
    assert conv_in.untyped_storage().nbytes() > conv_in.nbytes  # a view into the mapped checkpoint
    assert theirs.unet.conv_in.weight.untyped_storage().nbytes() == theirs.unet.conv_in.weight.nbytes
    request = GenerateRequest(prompt="a lighthouse", seed=5)
    twin = dataclasses.replace(ours, pipeline=theirs, active=None)
    assert ours.generate(request)[0] == twin.generate(request)[0]


def kohya_lora(pipe, folder, seed: int) -> str:
    """A kohya/A1111 LoRA (`lora_unet_…`, `lora_te1_…`, `lora_te2_…`, `.lora_down/.lora_up/.alpha`) on every
    attention projection of the UNet and both text encoders of `pipe`, alpha ≠ rank so the scaling shows."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for part, tag, targets in (("unet", "unet", ("to_q", "to_k", "to_v", "to_out.0")),
                               ("text_encoder", "te1", ("q_proj", "k_proj", "v_proj", "out_proj")),
                               ("text_encoder_2", "te2", ("q_proj", "k_proj", "v_proj", "out_proj"))):
        for name, layer in getattr(pipe, part).named_modules():
            name = name.removesuffix(".base_layer")  # a module that already holds adapters: its own Linear
            if name.endswith(targets) and isinstance(layer, torch.nn.Linear):
                if tag != "unet" and not name.startswith("text_model."):
                    name = "text_model." + name  # kohya's names, whichever way transformers nests CLIP
                stem = f"lora_{tag}_" + name.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"] = torch.randn(4, layer.in_features, generator=generator) * 0.05
                tensors[f"{stem}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=generator) * 0.05
                tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "style.safetensors"))
    return "style.safetensors"


def test_a_kohya_lora_on_unet_and_text_encoders_loads_as_diffusers_loads_it(cache, tmp_path):
    """Both text encoders' parts too: the same layers, configs (inference mode for the encoders, as transformers
    sets it), frozen parameters and image bytes as `load_lora_weights`, then the same after deleting it."""
    import dataclasses

    from workers.models.base import load_lora

    ours = mapped(cache)
    theirs = plain(cache)
    weight = kohya_lora(theirs, tmp_path / "kohya", seed=11)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(ours.pipeline), "load_lora_weights", lambda *a, **k: pytest.fail("fell back to diffusers"))
        load_lora(ours.pipeline, tmp_path / "kohya", {"weight_name": weight}, "kohya")
    theirs.load_lora_weights(str(tmp_path / "kohya"), weight_name=weight, adapter_name="kohya",
                             local_files_only=True)
    assert ours.pipeline.get_list_adapters() == theirs.get_list_adapters()
    assert ours.pipeline.get_list_adapters()["text_encoder_2"] == ["kohya"]
    assert "kohya" in ours.pipeline.get_list_adapters()["unet"]
    for part in ("unet", "text_encoder", "text_encoder_2"):
        mine, yours = getattr(ours.pipeline, part).peft_config, getattr(theirs, part).peft_config
        assert {k: c.to_dict() for k, c in mine.items()} == {k: c.to_dict() for k, c in yours.items()}, part
    assert_same_models(ours.pipeline, theirs)
    ours.adapters["kohya"] = ("kohya",)
    twin = dataclasses.replace(ours, pipeline=theirs, active=None, lora_disabled=False)
    request = GenerateRequest(prompt="Leather Jacket", seed=4)
    styled = ours.generate(request, "kohya")[0]
    assert styled == twin.generate(request, "kohya")[0]
    assert styled != ours.generate(request, CURRENT)[0]
    for pipe in (ours.pipeline, theirs):
        pipe.delete_adapters(["kohya"])
        pipe.set_adapters(["lora_v2_3_1"])  # the same active adapter on both (ours last drew CURRENT)
    assert ours.pipeline.get_list_adapters() == theirs.get_list_adapters() == {"unet": ["lora_v2_3_0", "lora_v2_3_1"]}
    assert_same_models(ours.pipeline, theirs)


def lora_state(pipe) -> dict:
    """Every LoRA layer's active adapters and scales, and every parameter's trainability."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for name, module in getattr(pipe, part).named_modules():
            if isinstance(module, BaseTunerLayer):
                state[f"{part}.{name}"] = (list(module.active_adapters), dict(module.scaling))
        state[part] = {k: p.requires_grad for k, p in getattr(pipe, part).named_parameters()}
    return state


def test_switching_adapters_leaves_what_diffusers_set_adapters_leaves(cache, tmp_path):
    """`ResidentPipeline.activate` walks only the LoRA layers (resident.set_adapters): switch after switch, with a
    LoRA on the text encoders too and after one is deleted, the same layer state as `pipeline.set_adapters`."""
    from workers.models.base import load_lora
    from workers.resident import set_adapters

    ours, theirs = mapped(cache), mapped(cache).pipeline
    weight = kohya_lora(theirs, tmp_path / "kohya", seed=3)
    for pipe in (ours.pipeline, theirs):
        load_lora(pipe, tmp_path / "kohya", {"weight_name": weight}, "kohya")
    for scale in (0.5, 2.0):  # scales set by hand on both: a switch must reset them as diffusers does
        for pipe in (ours.pipeline, theirs):
            for layer in pipe.text_encoder.modules():
                if hasattr(layer, "set_scale"):
                    layer.set_scale("kohya", scale)
        for names in (["lora_v2_3_1"], ["kohya"], ["lora_v2_3_0", "kohya"], ["lora_v2_3_0"]):
            set_adapters(ours.pipeline, names, ours._lora_layers)
            theirs.set_adapters(names)
            assert lora_state(ours.pipeline) == lora_state(theirs), names
    for pipe in (ours.pipeline, theirs):
        pipe.delete_adapters(["lora_v2_3_0"])
    set_adapters(ours.pipeline, ["kohya"], ours._lora_layers)
    theirs.set_adapters(["kohya"])
    assert lora_state(ours.pipeline) == lora_state(theirs)
    with pytest.raises(ValueError, match="lora_v2_3_0"):
        set_adapters(ours.pipeline, ["lora_v2_3_0"], ours._lora_layers)


def test_the_module_walk_and_resident_bytes_match_torch_s_own(cache):
    """workers.gpu.all_modules and named_modules walk by hand: the same modules (and names), once each, in
    `modules()` order (a module shared by two parents included once, under its first name), and the resident bytes are every distinct parameter and buffer counted once."""
    from workers.gpu import all_modules, named_modules, resident_bytes

    pipe = mapped(cache).pipeline
    pipe.unet.add_module("shared_again", pipe.unet.conv_in)  # one module reachable twice
    parts = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae]
    assert all_modules(*parts) == [m for part in parts for m in part.modules()]
    for part in parts:
        assert list(named_modules(part).items()) == list(part.named_modules())
    tensors = {id(t): t for part in parts for t in (*part.parameters(), *part.buffers())}
    assert resident_bytes(pipe) == sum(t.numel() * t.element_size() for t in tensors.values()) > 0


def test_a_model_with_buffers_or_tensor_attributes_is_not_built_on_meta(cache):
    """meta_modules puts every tensor on meta: only a model whose tensors are all parameters (which the file
    fills) may be built that way; one with a buffer or a tensor attribute is built with real buffers, and the
    pipeline is the same either way."""
    from workers.models import mapped as mapped_module
    from workers.models.mapped import _all_weights

    plain_model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GroupNorm(1, 2))
    assert _all_weights(plain_model.modules())
    with_buffer = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    assert not _all_weights(with_buffer.modules())

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.ones(2)  # a tensor that is neither parameter nor buffer

    assert not _all_weights(torch.nn.Sequential(Scaled()).modules())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mapped_module, "_all_weights", lambda modules: False)
        real = mapped(cache).pipeline
    assert_same_models(real, mapped(cache).pipeline)


def test_the_base_is_mapped_where_its_manifest_says_without_reading_headers(cache):
    """The manifest records each safetensors file's tensor layout at publish: the build maps the base from it (no
    header parsed: with the header reader failing, only the LoRA's header is read), the same tensors as from the
    header; a layout reaching past the file's end is not trusted (load_file reads the file)."""
    from workers.models import mapped as mapped_module
    from workers.models.mapped import header_layout, map_file, read_header

    read = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mapped_module, "read_header", lambda path: read.append(path) or read_header(path))
        ours = mapped(cache).pipeline
    assert read and all("lora" in str(path) for path in read)
    assert_same_models(ours, plain(cache))
    base = Release.parse(PREVIOUS).base
    entry = next(f for f in cache.store.manifest(base).files if f.path.startswith("unet/") and f.tensors)
    path = cache.store.path(base) / entry.path
    layout = [(t.name, t.dtype, t.shape, t.start, t.end) for t in entry.tensors]
    assert layout == [(n, d, tuple(s), b, e) for n, d, s, b, e in header_layout(*read_header(path))]
    by_layout, by_header = map_file(path, layout), map_file(path)
    assert list(by_layout) == list(by_header) and all(torch.equal(by_layout[k], by_header[k]) for k in by_header)
    name, kind, shape, begin, end = layout[-1]
    past_end = [*layout[:-1], (name, kind, shape, begin + path.stat().st_size, end + path.stat().st_size)]
    copied = map_file(path, past_end)  # refused: read by load_file, which copies
    assert all(torch.equal(copied[k], by_header[k]) for k in by_header)
    assert copied[name].untyped_storage().nbytes() == copied[name].nbytes


def test_gc_paused_holds_the_collector_off_and_restores_what_it_found():
    import gc

    from workers.models.mapped import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: the inner one leaves it off
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # off before, off after
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a failed build")
    assert gc.isenabled()


def test_a_successful_build_freezes_what_it_made_and_a_failed_one_is_collected_first(cache):
    """gc_paused(freeze=True), the builder's: a build leaves no cyclic garbage, so what it made is frozen (no
    collection walks it again); a dropped pipeline is still freed (by refcounting); a failed build's cyclic
    leftovers are collected before the next freeze keeps anything; retiring a release unfreezes."""
    import gc
    import weakref

    from workers.models.mapped import gc_paused

    class Held:
        pass

    gc.unfreeze()  # what earlier builds froze (and all it holds) collected now, not counted as this build's
    gc.collect()
    try:
        gc.disable()  # (a build inside a caller's own pause leaves the freezing to that caller)
        kept = mapped(cache)
        assert gc.collect() == 0  # the build left no cyclic garbage behind
        assert gc.get_freeze_count() == 0
        del kept  # (its two Rust tokenizers sit in reference cycles: a dropped pipeline leaves 14 small objects)
        gc.collect()
        gc.enable()
        built = mapped(cache)
        assert gc.get_freeze_count() > 0  # the build froze what it made
        unet = weakref.ref(built.pipeline.unet)
        del built
        assert unet() is None  # frozen, and still freed when dropped

        frozen = gc.get_freeze_count()
        with pytest.raises(RuntimeError), gc_paused(freeze=True):
            leftover = Held()
            leftover.cycle = leftover  # garbage only a collection frees, as a failed build's traceback cycle
            probe = weakref.ref(leftover)
            del leftover
            raise RuntimeError("a failed build")
        assert gc.get_freeze_count() == frozen  # a failed build freezes nothing
        assert probe() is not None
        with gc_paused(freeze=True):
            pass
        assert probe() is None  # collected before the next freeze, not kept forever

        resident = mapped(cache)
        assert gc.get_freeze_count() > 0
        resident.remove_release(CURRENT)
        assert gc.get_freeze_count() == 0  # retiring: whatever it drops is collectable again
    finally:
        gc.unfreeze()
        gc.enable()


def test_the_open_clip_conversion_gives_diffusers_names_and_values_as_views():
    """open_clip_views: an open-CLIP text encoder (SDXL's second) converted as diffusers converts it, every name and
    value the same, but q/k/v split out of each in_proj as views (no copy of the checkpoint's bytes)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from workers.models.mapped import open_clip_views

    width, layers, prefix = 16, 2, "conditioner.embedders.1.model."
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).half()

    checkpoint = {prefix + "text_projection": rand(width, width), prefix + "token_embedding.weight": rand(50, width),
                  prefix + "positional_embedding": rand(8, width), prefix + "ln_final.weight": rand(width),
                  prefix + "ln_final.bias": rand(width), prefix + "logit_scale": rand(1)}
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        checkpoint |= {block + "attn.in_proj_weight": rand(3 * width, width), block + "attn.in_proj_bias": rand(3 * width),
                       block + "attn.out_proj.weight": rand(width, width), block + "attn.out_proj.bias": rand(width),
                       block + "ln_1.weight": rand(width), block + "ln_1.bias": rand(width),
                       block + "ln_2.weight": rand(width), block + "ln_2.bias": rand(width),
                       block + "mlp.c_fc.weight": rand(4 * width, width), block + "mlp.c_fc.bias": rand(4 * width),
                       block + "mlp.c_proj.weight": rand(width, 4 * width), block + "mlp.c_proj.bias": rand(width)}
    model = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width,
                                                       num_hidden_layers=layers, num_attention_heads=2,
                                                       projection_dim=width, vocab_size=50, max_position_embeddings=8))
    theirs = convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
    ours = open_clip_views(convert_open_clip_checkpoint)(model, checkpoint, prefix=prefix)
    assert list(ours) != [] and set(ours) == set(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)
    qkv = [k for k in ours if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias",
                                          "k_proj.bias", "v_proj.bias"))]
    assert len(qkv) == 6 * layers
    sources = {checkpoint[k].untyped_storage().data_ptr() for k in checkpoint if "in_proj" in k}
    assert all(ours[k].untyped_storage().data_ptr() in sources for k in qkv)  # views of the checkpoint's tensors
    assert not any(theirs[k].untyped_storage().data_ptr() in sources for k in qkv)  # diffusers' are copies


def test_modules_built_with_the_short_setattr_are_the_modules_torch_builds(cache):
    """The build's short `nn.Module.__setattr__` (mapped.plain_setattr) leaves a UNet as torch's own method leaves
    it, attribute by attribute and tensor by tensor; torch's method is back after the block."""
    from diffusers import UNet2DConditionModel

    torch_setattr = torch.nn.Module.__setattr__
    config = UNet2DConditionModel.load_config(cache.store.path(Release.parse(PREVIOUS).base) / "unet")
    torch.manual_seed(0)
    theirs = UNet2DConditionModel.from_config(config)
    with plain_setattr():
        assert torch.nn.Module.__setattr__ is not torch_setattr
        torch.manual_seed(0)
        ours = UNet2DConditionModel.from_config(config)
    assert torch.nn.Module.__setattr__ is torch_setattr
    assert_same_module(ours, theirs, "unet")


def test_the_short_setattr_keeps_torch_s_rules_for_every_kind_of_assignment():
    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            self.early = 1  # before Module.__init__: a plain attribute, as torch allows
            super().__init__()
            self.child = torch.nn.Linear(2, 2)
            self.register_buffer("buf", torch.zeros(1))
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self._seen = None

        @property
        def watched(self):
            return self._seen

        @watched.setter
        def watched(self, value) -> None:
            self._seen = ("through the setter", value)

    outcomes = []
    for short in (False, True):
        with plain_setattr() if short else contextlib.nullcontext():
            probe = Probe()
            probe.size, probe.label, probe.flag, probe.watched = 3, "x", True, 5
            probe.weight = None  # a parameter's name: the parameter is set to None
            errors = []
            for name, value in (("child", 1), ("buf", "text"), ("weight", 2.0)):
                try:
                    setattr(probe, name, value)
                except TypeError as exc:
                    errors.append(str(exc))
            probe.child = None
            outcomes.append((probe.early, probe.size, probe.label, probe.flag, probe._seen, dict(probe._parameters),
                             dict(probe._modules), sorted(k for k in vars(probe) if not k.startswith("_")), errors))
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[1][-1]) == 3 and outcomes[1][4] == ("through the setter", 5)
    with pytest.raises(RuntimeError), plain_setattr():
        raise RuntimeError("a build that fails")
    assert torch.nn.Module.__setattr__.__qualname__ == "Module.__setattr__"
