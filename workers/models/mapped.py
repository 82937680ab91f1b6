"""L2 → L1 at disk speed: modules built without weights, weights taken as they lie in L2.

`from_pretrained` and `load_lora_weights` spend most of a build in Python walks over every module: diffusers and
transformers load through generic machinery (configs re-read, dtype rules, hooks), and peft's adapter injection
walks the whole model several times per adapter (match every module name against the targets, freeze every base
parameter, a `load_state_dict` over the whole UNet). For the layouts a worker loads every day this module does the
same work directly:

- `build_pipeline`: each model of a diffusers folder built from its config with empty weights (accelerate's
  `init_empty_weights`, as diffusers itself does: parameters on the meta device, buffers real), then its tensors
  assigned straight from the memory-mapped safetensors files (`load_state_dict(assign=True)`): on CPU no byte is
  copied (pages are read when first used), on a GPU the pipeline's `.to(device)` is the one host → device copy.
  A tensor stored in another dtype than the one asked for is converted, as diffusers does.
- `load_unet_lora`: a LoRA's layers (UNet and text encoders) made with peft's own layer classes (`LoraModel._create_new_module`,
  `LoraLayer.update_layer`) only at the modules its keys name, on the meta device, then given the file's tensors;
  the adapter is registered (`peft_config`) exactly as peft registers it, so diffusers' adapter API
  (`set_adapters`, `delete_adapters`, `disable_lora`, `get_list_adapters`) works on it unchanged.

Either returns None for anything it does not cover (a key it cannot place, a weight file in a form the folder's
loader would convert, DoRA, LoRA biases, …): the caller then takes the ordinary diffusers path, so the result is
always the same pipeline. tests/test_mapped_load.py checks that both paths give the same tensors, the same adapter
bookkeeping and the same image bytes for a seed.
"""

from __future__ import annotations

import copy
import gc
import json
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .layouts import variant_of

_UNSETTLED = [False]
"""A build has failed since the last freeze: its leftovers may be cyclic garbage the next freeze would keep."""


@contextmanager
def gc_paused(freeze: bool = False) -> Iterator[None]:
    """Python's cyclic garbage collector held off while a pipeline is built. A build allocates ~10 objects per
    module (modules, their dicts, parameters) and keeps them all, so the collector's generation thresholds trip
    every few hundred modules; each older-generation pass walks every object the process holds (~0.5 million
    after importing torch, diffusers, transformers and peft) and finds nothing to free: with it running, the
    736 LoRA layers of an SDXL LoRA cost twice what they cost without it. Refcounting still frees what a build
    drops; cyclic garbage waits for the first collection after the build. Nests: the outermost restores the
    state it found.

    `freeze` (the builder's): a build that succeeds ends with `gc.freeze()`: every object the collector tracks,
    the new pipeline's included, goes to its permanent generation, as servers do after warming up. Otherwise the
    first allocation after the build starts a young-generation pass over the ~20,000 containers a build made
    (~4 ms on a 0.6 GB SDXL-shaped release, tens of ms at full size), and every full collection while serving walks
    them again — for nothing: a build leaves no cyclic garbage, and a dropped pipeline is freed by refcounting
    (tests/test_mapped_load.py). Frozen objects are never collected as cyclic garbage, so what could be garbage
    is settled first: after a failed build (whose partial modules its traceback's cycle may hold) the next
    successful one runs a full collection before it freezes, and retiring a release unfreezes
    (`ResidentPipeline.remove_release`)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    except BaseException:
        if freeze:
            _UNSETTLED[0] = True
        raise
    else:
        if freeze and was:
            if _UNSETTLED[0]:
                gc.collect()
                _UNSETTLED[0] = False
            gc.freeze()
    finally:
        if was:
            gc.enable()


_PLAIN_VALUES = frozenset({int, float, bool, str, bytes, type(None)})


def _plain_setattr(module: Any, name: str, value: Any) -> None:
    """`nn.Module.__setattr__` with a short way for what a module's constructor mostly sets: a plain value (int,
    float, bool, str, None) under a name that is none of the module's parameters, buffers or children. For those,
    torch's own method ends in `object.__setattr__` after its Parameter, Module and Buffer checks (each
    `isinstance` through a metaclass); this goes there at once. Anything else takes torch's own way."""
    if type(value) in _PLAIN_VALUES:
        attrs = module.__dict__
        params, children, buffers = attrs.get("_parameters"), attrs.get("_modules"), attrs.get("_buffers")
        if not ((params is not None and name in params) or (children is not None and name in children)
                or (buffers is not None and name in buffers)):
            object.__setattr__(module, name, value)  # as torch's ends: a property's setter still runs
            return
    _TORCH_SETATTR[0](module, name, value)


_TORCH_SETATTR: list[Any] = []


@contextmanager
def plain_setattr() -> Iterator[None]:
    """Modules built with `_plain_setattr` as `nn.Module.__setattr__`: the same outcome for every assignment (so
    another thread building meanwhile is unaffected), ~1,900 of the ~3,200 assignments of an SDXL UNet's
    construction made without torch's checks. Nests; the outermost puts torch's own method back, unless the
    process installed it for good (`install_plain_setattr`)."""
    import torch

    if torch.nn.Module.__setattr__ is _plain_setattr:
        yield
        return
    install_plain_setattr()
    try:
        yield
    finally:
        torch.nn.Module.__setattr__ = _TORCH_SETATTR[0]


def install_plain_setattr() -> None:
    """`_plain_setattr` as `nn.Module.__setattr__` for the rest of this process: what a worker does at boot, since it
    builds pipelines for its whole life. Setting a method on `nn.Module` (and setting torch's back) invalidates
    the attribute caches of every module class (~800 once torch, diffusers, transformers and peft are imported), so
    a build inside `plain_setattr` starts with them cold: ~3 ms of a ~43 ms build of the large release here. The
    outcome of every assignment is torch's own (tests/test_mapped_load.py)."""
    import torch

    if torch.nn.Module.__setattr__ is not _plain_setattr:
        _TORCH_SETATTR[:] = [torch.nn.Module.__setattr__]
        torch.nn.Module.__setattr__ = _plain_setattr


@contextmanager
def empty_modules() -> Iterator[None]:
    """Modules built with no weights: parameters on the meta device, buffers real (accelerate's
    `init_empty_weights`, as diffusers loads), and torch's initialisers skipped (transformers' `no_init_weights`,
    as transformers loads) — on meta tensors they run as slow Python reference kernels and produce nothing."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    with init_empty_weights(), no_init_weights():
        yield


@contextmanager
def meta_modules() -> Iterator[None]:
    """Modules built with every tensor on the meta device (torch's default device meta) and torch's initialisers
    skipped. Unlike `empty_modules`, no parameter is first allocated in host memory and then moved to meta
    (accelerate's way, which keeps buffers real): ~2,000 allocations and frees of up to tens of MB per SDXL build,
    whose cost follows the allocator's state. Only for a model whose every tensor is a parameter (`_all_weights`):
    a buffer or tensor attribute made on meta would have no values to take from the file."""
    import torch
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        yield


def _all_weights(modules: Iterable[Any]) -> bool:
    """No module among `modules` (all of a model's) holds a buffer or a tensor outside its parameters."""
    import torch

    standard = _MODULE_ATTRS or _MODULE_ATTRS.update(torch.nn.Module().__dict__) or _MODULE_ATTRS
    for module in modules:
        if module._buffers:
            return False
        if type(module).__module__.startswith("torch.nn.modules."):
            continue  # torch's own layers keep their tensors as parameters or buffers
        attrs = module.__dict__
        if any(isinstance(attrs[key], torch.Tensor) for key in attrs.keys() - standard):
            return False
    return True


_MODULE_ATTRS: set[str] = set()
"""What `nn.Module.__init__` sets on every module (hook tables, parameters…): no tensor among them."""


def _weight_files(folder: Path, variant: str | None) -> list[Path] | None:
    """The safetensors files diffusers/transformers would load from `folder` for `variant`; None when unsure
    (sharded indexes are fine: every shard of the variant is loaded)."""
    files = [p for p in sorted(folder.glob("*.safetensors")) if variant_of(p.name) == variant]
    return files or None


DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, offset of the first data byte) of a safetensors file."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(size)), 8 + size


Layout = list[tuple[str, str, Any, int, int]]
"""A safetensors file's tensors as (name, dtype as the header spells it, shape, first byte, end byte), the bytes
counted from the start of the file."""


def header_layout(header: dict[str, Any], start: int) -> Layout:
    """The layout a safetensors header describes (`read_header`'s result)."""
    return [(name, info["dtype"], info["shape"], start + info["data_offsets"][0], start + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"]


def map_file(path: Path, layout: Layout | None = None) -> dict[str, Any]:
    """Every tensor of a safetensors file as a view of one private (copy-on-write) mapping of the file: no byte is
    read until a tensor is used, none is ever written back to L2. (`safetensors.torch.load_file` copies each
    tensor out of its mapping: ~50 ms per 0.5 GB, a whole extra pass over the bytes.) The tensors are where
    `layout` says, else where the file's header says; a file whose tensors are not aligned to their element size,
    lie beyond its end, or are of a dtype torch lacks, is read by `load_file` instead."""
    import torch
    from safetensors.torch import load_file

    if layout is None:
        layout = header_layout(*read_header(path))
    size = path.stat().st_size
    views: dict[str, Any] = {}
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if size else None
    for name, kind, shape, begin, end in layout:
        dtype = getattr(torch, DTYPES.get(kind, ""), None)
        if dtype is None or begin % dtype.itemsize or end > size:
            return load_file(str(path))
        view = torch.empty(0, dtype=dtype)
        if end > begin:
            view.set_(storage, begin // dtype.itemsize, shape)
        else:
            view = torch.empty(shape, dtype=dtype)
        views[name] = view
    return views


def _tensors(files: list[Path], layouts: dict[Path, Layout]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in files:
        out.update(map_file(path, layouts.get(path)))
    return out


def _plain_modules(model: Any, modules: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """name → module when no module changes how its state is saved or loaded (hooks, extra state, its own
    `_load_from_state_dict`): then a module's state is exactly its parameters and persistent buffers. `modules`:
    the model's `named_modules`, when the caller walked them already."""
    import torch

    from ..gpu import named_modules

    base = torch.nn.Module
    modules = named_modules(model) if modules is None else modules
    for module in modules.values():
        kind = type(module)
        if (module._state_dict_hooks or module._state_dict_pre_hooks or module._load_state_dict_pre_hooks
                or module._load_state_dict_post_hooks):
            return None
        if kind not in _PLAIN_CLASSES:
            if (kind._load_from_state_dict is not base._load_from_state_dict or kind.state_dict is not base.state_dict
                    or kind.get_extra_state is not base.get_extra_state):
                return None
            _PLAIN_CLASSES.add(kind)
    return modules


_PLAIN_CLASSES: set[type] = set()
"""Module classes that neither load nor save their state their own way (checked once per class)."""


def _assign(model: Any, tensors: dict[str, Any], dtype: Any, walked: dict[str, Any] | None = None) -> bool:
    """The file's tensors become the model's parameters and persistent buffers (no copy when the dtype matches).
    False, with the model untouched, when the names are not exactly the model's own. What
    `load_state_dict(assign=True)` does, without its per-module walk, when no module customises loading.
    `walked`: the model's `named_modules`, when the caller walked them already."""
    import torch

    modules = _plain_modules(model, walked)
    if modules is None:
        expected = model.state_dict(keep_vars=True)
        non_persistent = {name for name, _ in model.named_buffers()} - set(expected)
    else:
        expected, non_persistent = {}, set()
        for prefix, module in modules.items():
            head = f"{prefix}." if prefix else ""
            for name, value in module._parameters.items():
                if value is not None:
                    expected.setdefault(head + name, value)
            for name, value in module._buffers.items():
                if value is not None:
                    if name in module._non_persistent_buffers_set:
                        non_persistent.add(head + name)
                    else:
                        expected.setdefault(head + name, value)
        non_persistent -= set(expected)
    extra = set(tensors) - set(expected) - non_persistent  # an old checkpoint may still carry e.g. position_ids
    if set(expected) - set(tensors) or extra:
        return False
    state = {}
    for name, current in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(current.shape):
            return False
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        elif not tensor.is_floating_point() and tensor.dtype != current.dtype:
            tensor = tensor.to(current.dtype)
        state[name] = tensor
    if modules is None:
        with torch.no_grad():
            model.load_state_dict(state, strict=True, assign=True)
        return True
    _eval(modules.values())
    for key, tensor in state.items():
        prefix, _, name = key.rpartition(".")
        module = modules[prefix]
        if name in module._parameters:
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
        else:
            module._buffers[name] = tensor
    return True


def _eval(modules: Any) -> None:
    """`model.eval()` for a model whose every module is in `modules`: `training` set on each directly, without
    `train()`'s recursion and `__setattr__` per module; where some module has its own `train`, that is called."""
    import torch

    base = torch.nn.Module.train
    for module in modules:
        if type(module).train is not base:
            module.train(False)
        else:
            module.__dict__["training"] = False


def _diffusers_model(cls: Any, folder: Path, variant: str | None, dtype: Any, layouts: dict[Path, Layout]) -> Any:
    from ..gpu import named_modules

    files = _weight_files(folder, variant)
    if files is None:
        return None
    config = cls.load_config(folder)
    with meta_modules():
        model = cls.from_config(config)
    walked = named_modules(model)  # one walk for both checks
    if not _all_weights(walked.values()):
        with empty_modules():
            model = cls.from_config(config)
        walked = None
    if getattr(model, "_keep_in_fp32_modules", None) and dtype != model.dtype:
        return None  # mixed precision by module name: left to diffusers' own rules
    if not _assign(model, _tensors(files, layouts), dtype, walked):
        return None
    model.register_to_config(_name_or_path=str(folder))
    if model.training:  # `_assign` set every module to eval already where it walked them all
        model.eval()
    return model


def _transformers_config(config_class: Any, folder: Path) -> Any:
    """The model's config from its folder: read straight from config.json when that file is this config class's
    own (`from_json_file`, half the time of `from_pretrained`'s hub resolution); otherwise (a composite config
    whose part is wanted, say) `from_pretrained`, which knows how to pick it out."""
    path = folder / "config.json"
    try:
        own = json.loads(path.read_text()).get("model_type") == config_class.model_type
    except (OSError, ValueError, AttributeError):
        own = False
    return config_class.from_json_file(path) if own else config_class.from_pretrained(folder)


def _transformers_model(cls: Any, folder: Path, variant: str | None, dtype: Any,
                        layouts: dict[Path, Layout]) -> Any:
    files = _weight_files(folder, variant)
    if files is None:
        return None
    config = _transformers_config(cls.config_class, folder)
    if getattr(config, "tie_word_embeddings", False) and hasattr(cls, "get_output_embeddings") and \
            cls.__name__.endswith("LMHeadModel"):
        return None  # tied weights: transformers ties them while loading
    config.name_or_path = str(folder)
    with empty_modules():
        model = cls(config)
    if not _assign(model, _tensors(files, layouts), dtype):
        return None
    model.config.dtype = dtype
    if model.training:
        model.eval()
    return model


def build_pipeline(pipeline_cls: Any, folder: Path, dtype: Any, variant: str | None = None,
                   layouts: dict[Path, Layout] | None = None) -> Any:
    """A diffusers pipeline from its folder in L2, its weights mapped from the safetensors files; None when some
    part of the folder is not one this builder covers (the caller loads it with `from_pretrained`). `layouts`: the
    files' tensor layouts where already known (the version's manifest records each file's, read from its header
    at publish; the file is the manifest's, its hash checked when it came into L2), so their headers are not
    parsed again."""
    import diffusers
    import transformers

    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") != pipeline_cls.__name__:
        return None
    expected = set(pipeline_cls._get_signature_keys(pipeline_cls)[0]) | set(
        pipeline_cls._get_signature_keys(pipeline_cls)[1])
    parts: dict[str, Any] = {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, list):
            if name in expected:
                parts[name] = spec  # a pipeline setting such as force_zeros_for_empty_prompt
            continue
        library, class_name = spec
        if library is None:
            parts[name] = None
            continue
        module = {"diffusers": diffusers, "transformers": transformers}.get(library)
        cls = getattr(module, class_name, None) if module else None
        if cls is None:
            return None
        sub = folder / name
        if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin):
            part = _diffusers_model(cls, sub, variant, dtype, layouts or {})
        elif isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            part = _transformers_model(cls, sub, variant, dtype, layouts or {})
        elif hasattr(cls, "from_pretrained"):  # schedulers, tokenizers, feature extractors: no weights
            part = cls.from_pretrained(sub)
        else:
            return None
        if part is None:
            return None
        parts[name] = part
    pipe = pipeline_cls(**parts)
    pipe.register_to_config(_name_or_path=str(folder))
    return pipe


# -- LoRA


def _peft_unet_state(pipe: Any, path: Path, weight_name: str) -> tuple[dict[str, Any], dict[str, Any], Any, Any]:
    """(UNet part in peft's names, every other part as diffusers reads it, network alphas, metadata), read and
    converted by diffusers' own `lora_state_dict` (kohya/A1111 and diffusers formats alike)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils import convert_unet_state_dict_to_peft

    file = path / weight_name
    header, start = read_header(file)
    raw = header.get("__metadata__", {}).get(LORA_ADAPTER_METADATA_KEY)
    # the file's tensors mapped, not copied; diffusers reads its adapter metadata from the header the same way
    state, alphas, _ = pipe.lora_state_dict(map_file(file, header_layout(header, start)), unet_config=pipe.unet.config,
                                            return_lora_metadata=True)
    metadata = json.loads(raw) if raw else None
    if not all("lora" in key for key in state):
        raise ValueError("Invalid LoRA checkpoint. Make sure all LoRA param names contain `'lora'` substring.")
    prefix = "unet."
    unet = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if unet and "lora_A" not in next(iter(unet)):
        unet = convert_unet_state_dict_to_peft(unet)
    return unet, rest, alphas, metadata


def _unet_lora_config(unet: Any, state: dict[str, Any], alphas: Any, metadata: Any, name: str) -> Any:
    """The LoraConfig diffusers' `load_lora_adapter` makes for this state (same function; the model's state dict
    it also passes is not read by it)."""
    from diffusers.utils.peft_utils import _create_lora_config

    rank = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    if alphas:
        alphas = {k.removeprefix("unet."): v for k, v in alphas.items() if k.startswith("unet.")}
    if metadata is not None:
        metadata = {k.removeprefix("unet."): v for k, v in metadata.items() if k.startswith("unet.")}
    return _create_lora_config(state, alphas, metadata, rank, adapter_name=name)


def _plain(config: Any) -> bool:
    """A LoRA config this loader builds exactly as peft would: plain LoRA layers on Linear/Conv layers."""
    return (config.peft_type.value == "LORA" and not config.use_dora and not getattr(config, "lora_bias", False)
            and not config.modules_to_save and not getattr(config, "target_parameters", None)
            and not getattr(config, "layers_to_transform", None) and config.bias == "none"
            and config.init_lora_weights in (True, False) and not getattr(config, "trainable_token_indices", None) and not getattr(config, "alora_invocation_tokens",
                                                                                       None))


def inject_lora(model: Any, config: Any, name: str, state: dict[str, Any]) -> bool:
    """Adapter `name` on `model` at exactly the modules `state` names (peft's key layout: `<module>.lora_A.weight`),
    holding the state's tensors; what `inject_adapter_in_model` + `set_peft_model_state_dict(low_cpu_mem_usage=True)`
    leave behind, without their walks over every module. False, with the model untouched, when some key has no
    plain target."""
    import torch
    from peft.tuners.lora import LoraLayer, LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer, _find_minimal_target_modules, get_device_map
    from peft.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION
    from peft.utils.other import get_pattern_key

    from ..gpu import named_modules

    if name in getattr(model, "peft_config", {}) or not _plain(config):
        return False
    tensors: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        module_name, sep, rest = key.rpartition(".lora_")
        if not sep or rest not in ("A.weight", "B.weight"):
            return False
        tensors.setdefault(module_name, {})[rest[0]] = tensor
    modules = named_modules(model)  # one walk, for the targets, the first-adapter check and the condensing
    targets = []
    for module_name, pair in tensors.items():
        if set(pair) != {"A", "B"}:
            return False
        target = modules.get(module_name)
        if target is None:
            return False
        base = target.get_base_layer() if isinstance(target, LoraLayer) else target
        if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)) or (
                isinstance(target, BaseTunerLayer) and not isinstance(target, LoraLayer)):
            return False
        targets.append((module_name, target))
    first = not any(isinstance(m, BaseTunerLayer) for m in modules.values())
    before = [] if first else [(p, p.requires_grad) for p in model.parameters()]  # peft's snapshot, taken as it does
    targets_in_config = config.target_modules
    if isinstance(targets_in_config, (list, set)) and len(targets_in_config) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        # peft condenses a long list of module names into the shortest suffixes that match them and nothing else,
        # and registers that: the same call here keeps the registered config peft's
        suffixes = tuple("." + t for t in targets_in_config)
        others = [n for n in modules if n not in targets_in_config and not n.endswith(suffixes)]
        condensed = _find_minimal_target_modules(targets_in_config, others)
        if len(condensed) < len(targets_in_config):
            config.target_modules = condensed
    if not hasattr(model, "peft_config"):
        model.peft_config = {}
    model.peft_config[name] = config
    empty = copy.copy(config)  # the layers' A and B are the file's tensors: their random initialisation is skipped
    empty.init_lora_weights = False
    device_map = get_device_map(model)  # what peft's own injection passes each layer (kept in its kwargs)

    def peft_layer(target: Any, module_name: str, r: int, alpha: Any) -> Any:
        return LoraModel._create_new_module(
            empty, name, target, r=r, lora_alpha=alpha, target_name=module_name, loaded_in_8bit=False,
            loaded_in_4bit=False, ephemeral_gpu_offload=config.runtime_config.ephemeral_gpu_offload,
            parameter_name=None, tied_adapter={}, device_map=dict(device_map))

    cloner = _LinearCloner(name, peft_layer)
    try:
        layers = []
        with empty_modules():  # once for all layers: entering it patches torch's initialisers
            for module_name, target in targets:
                r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module_name), config.r)
                alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module_name),
                                                 config.lora_alpha)
                if isinstance(target, LoraLayer):
                    target.update_layer(name, r, lora_alpha=alpha, target_name=module_name, config=empty)
                    layer = target
                else:
                    layer, filled = cloner.layer(target, module_name, r, alpha, tensors[module_name])
                    parent_name, _, child = module_name.rpartition(".")
                    _replace_child(modules[parent_name], child, layer)
                    if filled:  # a copy already holding the file's tensors, in the base weight's dtype and device
                        continue
                layers.append((module_name, layer))
        for module_name, layer in layers:  # outside: a parameter set under empty_modules would go to meta
            base_weight = layer.get_base_layer().weight
            for side, tensor in tensors[module_name].items():
                linear = getattr(layer, f"lora_{side}")[name]
                if tuple(tensor.shape) != tuple(linear.weight.shape):
                    raise _size_mismatch(f"{module_name}.lora_{side}.weight", tensor.shape, linear.weight.shape)
                linear.weight = torch.nn.Parameter(tensor, requires_grad=linear.weight.requires_grad)
            if any(p.dtype != base_weight.dtype or p.device != base_weight.device
                   for side in "AB" for p in getattr(layer, f"lora_{side}")[name].parameters()):
                layer._move_adapter_to_device_of_base_layer(name)
    except Exception:
        _undo(model, name)
        raise
    # peft's housekeeping after an injection: the new adapter is every LoRA layer's active one, every parameter but
    # the LoRA ones frozen, then (after a first adapter) every parameter that was there keeps its trainability
    # (one walk for both: `set_adapter` sets only the LoRA parameters' flags, the freeze only the others'; each
    # parameter is named as `named_parameters` names it, by its first path)
    # (a first adapter: every LoRA layer is one made here, peft's or a copy of peft's, and each was left active on
    # it by peft's `update_layer` with this inference mode, so only the freeze walks the model, over the modules
    # as they were before the injection: the new layers hold LoRA parameters only)
    seen: set[int] = set()
    for prefix, module in (modules.items() if first else model.named_modules()):
        if not first and isinstance(module, LoraLayer):
            module.set_adapter([name], inference_mode=config.inference_mode)
        in_lora = "lora_" in prefix  # "lora_" cannot straddle the "." that joins prefix and name
        for n, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if not in_lora and "lora_" not in n:
                p.requires_grad = False
    for p, requires_grad in before:
        p.requires_grad = requires_grad
    model._hf_peft_config_loaded = True
    return True


class _LinearCloner:
    """peft's LoRA `Linear` layers for many `nn.Linear` targets of one adapter, most of them copied from one that
    peft made instead of made by peft. peft's constructor costs ~0.3 ms a layer (a dozen ModuleDicts set through
    `nn.Module.__setattr__`, a walk of the config's fields, `set_adapter`, the device check); a copy takes the first
    layer's attributes (containers copied, so no two layers share a dict or a hook table) and changes only what
    depends on the target: the base layer, the feature counts, the rank, alpha and scaling, the target name, and
    lora_A/lora_B's shapes and weights.

    Each build proves the copy on the installed peft: the second layer, and the first whose shape differs from the
    first layer's, are made by peft and by copying, and compared attribute by attribute (`_same_layer`). Any
    difference, any attribute outside the ones known here, or a target that is not exactly an `nn.Linear`, and
    every layer is made by peft."""

    def __init__(self, adapter: str, make: Any) -> None:
        self.adapter, self.make = adapter, make
        self.template: Any = None
        self.top: list[str] = []  # the template's containers, then its children's and grandchildren's
        self.plan: list[tuple[str, Any, list[str], list[tuple[str, Any, list[str]]]]] = []
        self.proved: set[str] = set()  # "same shape", "other shape": the checks passed
        self.off = False

    def layer(self, target: Any, module_name: str, r: int, alpha: Any, pair: dict[str, Any]) -> tuple[Any, bool]:
        """(the layer for `target`, whether its lora_A/lora_B already hold `pair`'s tensors)."""
        import torch

        if self.off or type(target) is not torch.nn.Linear:
            return self.make(target, module_name, r, alpha), False
        if self.template is None:
            self.template = self.make(target, module_name, r, alpha)
            self.off = not _clonable(self.template, self.adapter)
            if not self.off:
                self.top = _containers(self.template)
                self.plan = [(key, child, _containers(child),
                              [(k, v, _containers(v)) for k, v in child._modules.items()])
                             for key, child in self.template._modules.items() if key != "base_layer"]
            return self.template, False
        kind = "same shape" if (target.in_features, target.out_features, r) == (
            self.template.in_features, self.template.out_features, self.template.r[self.adapter]) else "other shape"
        if kind in self.proved:
            return self._copy(target, module_name, r, alpha, pair)
        made = self.make(target, module_name, r, alpha)
        if _same_layer(self._copy(target, module_name, r, alpha, None)[0], made):
            self.proved.add(kind)
        else:
            self.off = True
        return made, False

    def _copy(self, target: Any, module_name: str, r: int, alpha: Any, pair: dict[str, Any] | None) -> tuple[Any, bool]:
        """A copy of the template for `target`. With `pair`, lora_A/lora_B get its tensors when they already have
        the base weight's dtype and device (else, and without `pair`, placeholders as peft makes them, on meta)."""
        import math

        import torch

        template, name = self.template, self.adapter
        layer = _copy_module(template, self.top)
        modules = layer.__dict__["_modules"]
        modules["base_layer"] = target
        for key, child, keys, grandchildren in self.plan:
            copied = modules[key] = _copy_module(child, keys)
            copied._modules.update({k: _copy_module(v, ks) for k, v, ks in grandchildren})
        d = layer.__dict__
        d["in_features"], d["out_features"] = target.in_features, target.out_features
        d["r"][name] = r
        d["lora_alpha"][name] = alpha
        d["scaling"][name] = alpha / math.sqrt(r) if template.use_rslora[name] else alpha / r
        kwargs = d["kwargs"]
        kwargs["target_name"] = module_name
        kwargs["tied_adapter"], kwargs["device_map"] = {}, dict(template.kwargs["device_map"])
        a, b = modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
        a.__dict__["in_features"], a.__dict__["out_features"] = target.in_features, r
        b.__dict__["in_features"], b.__dict__["out_features"] = r, target.out_features
        base = target.weight
        final = pair is not None and all(t.dtype == base.dtype and t.device == base.device for t in pair.values())
        for side, linear, shape in (("A", a, (r, target.in_features)), ("B", b, (target.out_features, r))):
            weight = linear._parameters["weight"]
            if final:
                tensor = pair[side]
                if tuple(tensor.shape) != shape:
                    raise _size_mismatch(f"{module_name}.lora_{side}.weight", tensor.shape, shape)
            else:
                tensor = torch.empty(shape, dtype=weight.dtype, device=weight.device)
            linear._parameters["weight"] = torch.nn.Parameter(tensor, requires_grad=weight.requires_grad)
        return layer, final


def _replace_child(parent: Any, name: str, module: Any) -> None:
    """`setattr(parent, name, module)` for a name that is already one of `parent`'s submodules: what
    `nn.Module.__setattr__` ends up doing there, without its checks, unless global module registration hooks
    are set (then it is called)."""
    from torch.nn.modules import module as torch_module

    if (name in parent._modules and name not in parent.__dict__ and name not in parent._parameters
            and name not in parent._buffers and not torch_module._global_module_registration_hooks):
        parent._modules[name] = module
    else:
        setattr(parent, name, module)


def _size_mismatch(key: str, got: Any, want: Any) -> ValueError:
    return ValueError(f"size mismatch for {key}: copying a param with shape {list(got)} from the LoRA, the shape in "
                      f"the model is {list(want)}: the LoRA was not trained on this base")


_LORA_LINEAR_ATTRS = {
    "r", "lora_alpha", "scaling", "_disable_adapters", "merged_adapters", "use_dora", "use_rslora", "lora_bias",
    "_caches", "ephemeral_gpu_offload", "cast_input_dtype_enabled", "lora_variant", "kwargs", "in_features",
    "out_features", "fan_in_fan_out", "_active_adapter", "is_target_conv_1d_layer"}
"""A peft LoRA `Linear`'s own attributes (beyond nn.Module's) that `_LinearCloner` knows how to copy."""


def _clonable(layer: Any, adapter: str) -> bool:
    """A plain LoRA layer of one adapter: known attributes only, no hooks, no variant, one bias-free Linear in
    lora_A and lora_B, nothing in the other adapter dicts but a parameterless dropout."""
    import torch

    base = set(torch.nn.Module().__dict__)
    own = set(layer.__dict__) - base
    modules = layer._modules
    if any(isinstance(v, (dict, list, set)) and any(isinstance(x, (dict, list, set)) for x in (
            v.values() if isinstance(v, dict) else v)) for k, v in layer.__dict__.items() if k in own - {"kwargs"}):
        return False  # containers in containers: a one-level copy would share them
    if own != _LORA_LINEAR_ATTRS or set(modules) != {
            "base_layer", "lora_dropout", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
            "lora_magnitude_vector"} or layer.lora_variant or layer._caches or layer.merged_adapters:
        return False
    for key, child in modules.items():
        if key == "base_layer":
            continue
        if _hooked(child) or child._parameters or child._buffers or set(child._modules) != (
                {adapter} if key in ("lora_dropout", "lora_A", "lora_B") else set()):
            return False
        for sub in child._modules.values():
            if _hooked(sub) or sub._modules or sub._buffers:
                return False
    a, b = modules["lora_A"][adapter], modules["lora_B"][adapter]
    return (type(a) is type(b) is torch.nn.Linear and a._parameters.get("bias") is None
            and b._parameters.get("bias") is None and not modules["lora_dropout"][adapter]._parameters
            and not _hooked(layer))


def _hooked(module: Any) -> bool:
    return any(isinstance(v, dict) and v for k, v in module.__dict__.items() if k.endswith("_hooks") or k in (
        "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"))


def _containers(module: Any) -> list[str]:
    """The attributes of `module` that are containers (dicts, lists, sets): what a copy must not share."""
    return [key for key, value in module.__dict__.items() if isinstance(value, (dict, list, set))]


def _copy_module(module: Any, containers: list[str]) -> Any:
    """A new module of the same class whose attributes are the original's, the `containers` copied one level deep
    (parameters and submodules are shared until the caller replaces them)."""
    copied = object.__new__(type(module))
    d = dict(module.__dict__)
    for key in containers:
        d[key] = d[key].copy()
    copied.__dict__.update(d)
    return copied


def _same_layer(a: Any, b: Any, path: str = "") -> bool:
    """Two modules alike attribute by attribute, the submodules too (a base layer only by its shape: each is its
    own target); tensors by class, shape, dtype, device and trainability."""
    import torch

    if type(a) is not type(b) or set(a.__dict__) != set(b.__dict__):
        return False
    for key, x in a.__dict__.items():
        y = b.__dict__[key]
        if key == "_modules":
            if list(x) != list(y):
                return False
            for k in x:
                if k == "base_layer" and not path:
                    if x[k] is not y[k]:  # both made for the same target
                        return False
                elif not _same_layer(x[k], y[k], f"{path}.{k}"):
                    return False
        elif key in ("_parameters", "_buffers"):
            if list(x) != list(y):
                return False
            for k in x:
                p, q = x[k], y[k]
                if (p is None) != (q is None):
                    return False
                if p is not None and (type(p) is not type(q) or p.shape != q.shape or p.dtype != q.dtype
                                      or p.device != q.device or p.requires_grad != q.requires_grad):
                    return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return False
        else:
            try:
                if x != y:
                    return False
            except Exception:
                return False
    return True


def _undo(model: Any, name: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and name in module.lora_A:
            module.delete_adapter(name)
    model.peft_config.pop(name, None)


def load_unet_lora(pipe: Any, path: Path, weight_name: str, name: str) -> bool:
    """A LoRA file as adapter `name` of the pipeline: its UNet and text-encoder parts injected here (a text-encoder
    part `inject_lora` does not cover goes to diffusers' loader). False, with nothing loaded, when the UNet part is
    not one `inject_lora` covers (the caller then uses `load_lora_weights`)."""
    if not hasattr(pipe, "lora_state_dict") or not hasattr(pipe, "unet"):
        return False
    unet_state, rest, alphas, metadata = _peft_unet_state(pipe, Path(path), weight_name)
    if not unet_state:
        return False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        config = _unet_lora_config(pipe.unet, unet_state, alphas, metadata, name)
        if not inject_lora(pipe.unet, config, name, unet_state):
            return False
    try:
        for prefix in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, prefix, None)
            if encoder is None or not any(k.startswith(prefix + ".") for k in rest):
                continue
            if not load_text_encoder_lora(encoder, prefix, rest, alphas, metadata, name, pipe.lora_scale):
                pipe.load_lora_into_text_encoder(rest, network_alphas=alphas, text_encoder=encoder, prefix=prefix,
                                                 lora_scale=pipe.lora_scale, adapter_name=name, metadata=metadata,
                                                 _pipeline=pipe, low_cpu_mem_usage=True)
    except Exception:
        pipe.delete_adapters([name])
        raise
    return True


def load_text_encoder_lora(encoder: Any, prefix: str, state: dict[str, Any], alphas: Any, metadata: Any, name: str,
                           scale: float) -> bool:
    """A text encoder's part of a LoRA as adapter `name`: the keys, ranks, alphas and LoraConfig exactly as
    diffusers' `_load_lora_into_text_encoder` derives them, then what transformers' `load_adapter` leaves behind
    (the config in inference mode, the adapter frozen, the encoder in eval mode), with the layers made by
    `inject_lora`. False, with nothing loaded, for what that does not cover."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.tuners.tuners_utils import BaseTunerLayer

    if scale != 1.0 or name in (getattr(encoder, "peft_config", None) or {}):
        return False
    part = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    if metadata is not None:
        metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(encoder, "text_model"):
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    rank = {f"{n}.lora_B.weight": part[f"{n}.lora_B.weight"].shape[1] for n, _ in encoder.named_modules()
            if n.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2"))
            and f"{n}.lora_B.weight" in part}
    if alphas is not None:
        alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items()
                  if k.startswith(prefix) and k.split(".")[0] == prefix}
    config = _create_lora_config(part, alphas, metadata, rank, is_unet=False)
    config.inference_mode = True  # transformers' load_adapter(is_trainable=False)
    if not inject_lora(encoder, config, name, part):
        return False
    encoder.eval()
    for module in encoder.modules():
        if isinstance(module, BaseTunerLayer):
            module.requires_grad_(False)
    return True


@contextmanager
def mapped_single_file() -> Iterator[None]:
    """Within it, diffusers' `from_single_file` reads a `.safetensors` checkpoint as `map_file` does (views of one
    private mapping) instead of `load_file` (a copy of every tensor: for a 6.9 GB SDXL file, 6.9 GB of process
    memory and a full pass over the bytes before any conversion), and converts an open-CLIP text encoder without
    copying its attention weights (`open_clip_views`). Same tensors, same conversion, same modules.
    torch's and transformers' initialisers are skipped meanwhile, as transformers' own loading skips them: the
    modules are built on the meta device, where initialising runs slow Python reference kernels for nothing.
    diffusers looks both functions up on their modules at each call, so the replacements are seen there and undone
    on exit; any other checkpoint form goes to diffusers' own functions."""
    from diffusers.loaders import single_file, single_file_utils

    original = single_file.load_single_file_checkpoint
    convert = single_file_utils.convert_open_clip_checkpoint

    def load(path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        file = Path(str(path))
        if file.suffix == ".safetensors" and file.is_file() and not kwargs.get("disable_mmap"):
            return map_file(file)
        return original(path, *args, **kwargs)

    from transformers.initialization import no_init_weights

    single_file.load_single_file_checkpoint = load
    single_file_utils.convert_open_clip_checkpoint = open_clip_views(convert)
    try:
        with no_init_weights():  # diffusers builds the CLIP encoders empty but lets transformers initialise them
            yield
    finally:
        single_file.load_single_file_checkpoint = original
        single_file_utils.convert_open_clip_checkpoint = convert


_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def open_clip_views(convert: Any) -> Any:
    """diffusers' `convert_open_clip_checkpoint` (`convert`), but each q/k/v weight and bias it splits out of an
    attention layer's `in_proj` is a view of that tensor instead of a copy: diffusers clones all 192 of an SDXL
    open-CLIP encoder (~315 MB of fp16 read out of the mapped checkpoint, 0.1–0.45 s of a ~0.8 s build, varying with
    the page cache). The names come from `convert` itself: it converts the checkpoint without the in_proj tensors,
    then each in_proj tensor on its own as an empty (meta) stand-in, whose q/k/v parts it names; the view takes the
    part's rows. tests/test_mapped_load.py compares every name and value with `convert`'s."""

    def converted(text_model: Any, checkpoint: dict[str, Any], prefix: str = "cond_stage_model.model.") -> dict:
        import torch

        in_proj = [k for k in checkpoint if k.startswith(prefix + "transformer.")
                   and k.endswith((".in_proj_weight", ".in_proj_bias"))]
        if not in_proj:
            return convert(text_model, checkpoint, prefix=prefix)
        skip = set(in_proj)
        out = convert(text_model, {k: v for k, v in checkpoint.items() if k not in skip}, prefix=prefix)
        text_projection = prefix + "text_projection"
        for key in in_proj:
            value = checkpoint[key]
            probe = {key: torch.empty(value.shape, dtype=value.dtype, device="meta")}
            if text_projection in checkpoint:  # the split size diffusers reads from it
                projection = checkpoint[text_projection]
                probe[text_projection] = torch.empty(projection.shape, dtype=projection.dtype, device="meta")
            for name, part in convert(text_model, probe, prefix=prefix).items():
                if name in out:  # the text projection, converted already
                    continue
                index = _QKV.get(name.rsplit(".", 2)[-2]) if name.count(".") >= 2 else None
                if index is None:
                    return convert(text_model, checkpoint, prefix=prefix)  # a layout not known here: copies
                # q and k are the first two blocks of d rows, v the rest (diffusers' own split)
                start = index * part.shape[0] if index < 2 else value.shape[0] - part.shape[0]
                view = value[start:start + part.shape[0]]
                if view.shape != part.shape or view.dtype != part.dtype:
                    return convert(text_model, checkpoint, prefix=prefix)
                out[name] = view
        return out

    return converted
