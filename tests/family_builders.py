"""Find every transformers MoE experts class on the experts interface and build a tiny one.

Discovery is by shape, not by name list: a class named ``...Experts`` defined in
``transformers.models.<name>.modeling_<name>`` whose ``forward`` carries ``__wrapped__`` (the
``@use_experts_implementation`` decorator). A family added in a later transformers release is
picked up without edits here.

Building reads the family's own config classes: the candidates are every config class of the
family and its sub-configs, tried best name match first; each gets its size attributes shrunk
(whatever names the family uses), and the first one the experts class builds from wins.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pkgutil
from dataclasses import dataclass

import torch
from torch import nn

NUM_EXPERTS = 4
# Size attributes under the names families use for them, set wherever the config has the
# attribute: defaults may be None (MoE off by default) or per-modality lists (Ernie 4.5 VL).
SIZES = {
    "hidden_size": 16,
    "moe_hidden_size": 16,
    "moe_latent_size": 8,  # NemotronH: experts run in a latent width other than hidden_size
    "intermediate_size": 12,
    "moe_intermediate_size": 12,
    "num_experts": NUM_EXPERTS,
    "num_local_experts": NUM_EXPERTS,
    "n_routed_experts": NUM_EXPERTS,
    "moe_num_experts": NUM_EXPERTS,
    "swiglu_limit": 1.0,  # small enough that the clamp bites on tiny random inputs
    # whole 4.x MoE blocks: routing and shared experts
    "num_experts_per_tok": 2,
    "moe_topk": 2,  # Hunyuan's name for it
    "moe_k": 2,  # ERNIE 4.5's
    "n_group": 2,
    "topk_group": 1,
    "n_shared_experts": 1,
    "shared_expert_intermediate_size": 12,
    "expert_ffn_hidden_size": 12,
    "zero_expert_num": 2,  # LongCat's identity experts, routed beside the MLP ones
}
MAX_PARAMS = 1_000_000  # a family whose sizes went unshrunk is refused, not allocated

# Families that cannot be built, with the reason. Keep empty where possible.
KNOWN_UNBUILDABLE: dict[str, str] = {}


@dataclass(frozen=True)
class ExpertsClass:
    family: str  # transformers.models.<family>
    cls: type

    @property
    def name(self) -> str:
        return self.cls.__name__


def _is_experts_class(obj, module_name: str) -> bool:
    return (isinstance(obj, type) and obj.__module__ == module_name
            and obj.__name__.endswith("Experts")
            and hasattr(getattr(obj, "forward", None), "__wrapped__"))


def _may_define_experts(models_dir: str, family: str) -> bool:
    """A cheap text test before the import: a class named ``...Experts`` has that word in its
    module's source. Importing all 500+ modeling modules takes seconds; under 80 pass this."""
    path = os.path.join(models_dir, family, f"modeling_{family}.py")
    try:
        with open(path, encoding="utf-8") as f:
            return "Experts" in f.read()
    except OSError:  # no source file (none, or a compiled-only install): import to see
        return True


def _modeling_module(family: str):
    try:
        return importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except Exception:  # missing optional dependencies, or no modeling module at all
        return None


def discover() -> list[ExpertsClass]:
    """Every experts class on transformers' experts interface, sorted by class name."""
    import transformers.models

    found = []
    for models_dir in transformers.models.__path__:
        for info in pkgutil.iter_modules([models_dir]):
            found += _experts_classes(models_dir, info.name)
    return sorted(found, key=lambda e: e.name)


def _experts_classes(models_dir: str, family: str) -> list[ExpertsClass]:
    if not _may_define_experts(models_dir, family):
        return []
    mod = _modeling_module(family)
    if mod is None:
        return []
    return [ExpertsClass(family, obj) for obj in vars(mod).values()
            if _is_experts_class(obj, mod.__name__)]


def _config_classes(family: str) -> list[type]:
    import transformers

    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    mod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    return [c for c in vars(mod).values() if isinstance(c, type)
            and issubclass(c, base) and c.__module__ == mod.__name__]


def _stem(config) -> str:
    return type(config).__name__.removesuffix("Config")


def _nested(config, path: str) -> list[tuple[str, object]]:
    """``config`` and its sub-configs, each with a path name: the thinker's ``text_config`` is
    ``Qwen3OmniMoeThinkerText`` (its class alone, ``Qwen3OmniMoeTextConfig``, says less)."""
    out = [(path, config)]
    for key in getattr(config, "sub_configs", None) or {}:
        with contextlib.suppress(Exception):
            sub = getattr(config, key)
            if hasattr(sub, "to_dict"):
                part = "".join(w.capitalize() for w in key.removesuffix("_config").split("_"))
                out += _nested(sub, path + part)
    return out


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a.lower(), b.lower()]))


def _score(experts_name: str, path: str, config) -> tuple[int, bool]:
    """Longest shared name first (Talker vs Thinker), then a text config (the main stack)."""
    stem = experts_name.removesuffix("Experts")
    shared = max(_common_prefix(stem, path), _common_prefix(stem, _stem(config)))
    return shared, "Text" in _stem(config)


def _homogeneous(config):
    """A config whose per-layer attributes read without AmbiguousGlobalPerLayerAttributeError:
    layer 0's view, as a model layer would receive it."""
    if getattr(config, "is_heterogeneous", False):
        return config.per_layer_config[0]
    return config


def _candidates(ec: ExpertsClass) -> list:
    """The family's configs, best match for ``ec`` first."""
    found = []
    for cls in _config_classes(ec.family):
        with contextlib.suppress(Exception):  # a config that needs arguments is not one
            root = cls()
            found += _nested(root, _stem(root))
    ranked = sorted(found, key=lambda pc: _score(ec.name, *pc), reverse=True)
    return [_homogeneous(config) for _, config in ranked]


def _shrink(config) -> None:
    for attr, value in SIZES.items():
        with contextlib.suppress(Exception):  # absent, or unreadable on this config
            current = getattr(config, attr)
            if isinstance(current, list | tuple):  # one per modality; strict configs keep lists
                value = type(current)([value] * len(current))
            setattr(config, attr, value)
    config._experts_implementation = "eager"


def _size_kwargs(cls: type) -> dict:
    """Sizes for ``__init__`` arguments beyond the config that are named like one (Ernie 4.5
    VL's block passes ``intermediate_size`` from a per-modality list)."""
    params = list(inspect.signature(cls.__init__).parameters)[2:]
    return {p: SIZES[p] for p in params if p in SIZES}


def _build_on(cls: type, config) -> nn.Module:
    kwargs = _size_kwargs(cls)
    with torch.device("meta"):  # sizes first: refuse a family whose sizes were not shrunk
        probe = cls(config, **kwargs)
    n = sum(p.numel() for p in probe.parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"{n} parameters: size attributes not shrunk (see SIZES)")
    return cls(config, **kwargs)


def _is_modulelist_block(obj, module_name: str) -> bool:
    """A transformers 4.x MoE block: an ``nn.Module`` whose ``__init__`` builds ``experts`` as an
    ``nn.ModuleList``."""
    if not (isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module_name
            and "__init__" in vars(obj)):
        return False
    try:
        source = inspect.getsource(obj.__init__)
    except (OSError, TypeError):
        return False
    return "self.experts = nn.ModuleList" in source


def discover_blocks() -> list[ExpertsClass]:
    """Every MoE block whose experts are an ``nn.ModuleList`` (transformers 4.x), by name."""
    import transformers.models

    found = []
    for models_dir in transformers.models.__path__:
        for info in pkgutil.iter_modules([models_dir]):
            path = os.path.join(models_dir, info.name, f"modeling_{info.name}.py")
            with contextlib.suppress(OSError):
                with open(path, encoding="utf-8") as f:
                    if "self.experts = nn.ModuleList" not in f.read():
                        continue
            mod = _modeling_module(info.name)
            if mod is not None:
                found += [ExpertsClass(info.name, obj) for obj in vars(mod).values()
                          if _is_modulelist_block(obj, mod.__name__)]
    return sorted(found, key=lambda e: e.name)


def build_block(ec: ExpertsClass, seed: int = 0) -> nn.Module:
    """A tiny fp32 4.x MoE block with :data:`NUM_EXPERTS` routed expert MLPs (LongCat's
    identity experts beside them)."""
    return build(ec, seed, lambda block: sum(not isinstance(e, nn.Identity)
                                             for e in block.experts))


def init_small(module: nn.Module, seed: int = 0) -> None:
    """Small random parameters, biases and norms included (``torch.empty`` leaves garbage)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)


def build(ec: ExpertsClass, seed: int = 0, count=lambda m: m.num_experts) -> nn.Module:
    """A tiny fp32 ``ec.cls`` with small random parameters; raises with every attempt's error.
    ``count(module)``: its experts, which must be :data:`NUM_EXPERTS` (an expert count under a
    name SIZES does not know would leave it unshrunk)."""
    errors = []
    for config in _candidates(ec):
        _shrink(config)
        try:
            module = _build_on(ec.cls, config)
            if count(module) != NUM_EXPERTS:
                raise ValueError(f"{count(module)} experts, not {NUM_EXPERTS}")
        except Exception as e:  # the wrong config for this class: try the next one
            errors.append(f"{type(config).__name__}: {type(e).__name__}: {e}")
            continue
        module = module.float()
        init_small(module, seed)
        return module
    raise RuntimeError(f"cannot build {ec.name}:\n  " + "\n  ".join(errors or ["no config"]))


def input_width(module: nn.Module) -> int:
    """The width of the hidden states the experts take (a latent size for some families)."""
    w = module.down_proj  # [E, out, in], or [E, in, out] when transposed
    return w.shape[-1] if module.is_transposed else w.shape[1]
