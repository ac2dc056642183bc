"""The rules that decide which parameters get which weight decay, as one value: :class:`GroupRules`.

Pure PyTorch: no Lightning import. Three kinds of rule exist:

* **module types**: every parameter registered *directly* on a module of a listed type (or for
  which a listed predicate returns ``True``) is excluded. Parameters of its child modules are
  judged by their own owner, so a norm layer that holds a ``Linear`` projection does not exclude
  the projection.
* **name patterns**, matched segment by segment against cleaned qualified names:

  * a pattern **without a dot** matches the parameter's own name, the last segment: ``"bias"``
    matches ``encoder.0.bias`` but not ``bias_scale``; ``"*_bias"`` matches ``attn.in_proj_bias``;
  * a pattern **with a dot** matches the whole name: ``*`` matches within one segment, ``**`` any
    number of segments (zero included): ``"encoder.*.pos_embed"``, ``"**.cls_token"``;
  * ``?`` matches one character and ``[abc]`` a character class, never a dot.

* **declarations**: a module's own ``no_weight_decay()`` method (the timm/DeiT convention).
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from lightning_nodecay._patterns import check_patterns
from lightning_nodecay._schema import Toward

ModulePredicate = Callable[[nn.Module], bool]
ModuleRule = Union[type[nn.Module], ModulePredicate]  # noqa: UP007 (a runtime alias)
#: A rule key of multipliers and L1 rules: a name pattern, a module type, or a module predicate.
RuleKey = Union[str, ModuleRule]  # noqa: UP007 (a runtime alias)
#: A model's own layer ids: ``{name pattern: layer id}`` or ``(name) -> layer id | None``.
LayerIds = Union[Mapping[str, int], Callable[[str], Union[int, None]]]  # noqa: UP007 (a runtime alias)
#: Where decayed parameters are pulled: ``"zero"``, ``"initial"``, ``{rule key: "initial" | "zero"}``, or a
#: reference state dict ``{name: tensor}`` (or the path of a file holding one).
TowardRules = Union[str, Mapping[RuleKey, str], Mapping[str, Tensor]]  # noqa: UP007 (a runtime alias)

_NORM_CLASS_NAME = re.compile(r"Norm(alization)?(Act)?(\d+d?)?$")


def norm_by_class_name(module: nn.Module) -> bool:
    """Tell whether ``module`` is a normalization layer judged by its class name.

    Catches custom norm classes that do not inherit from PyTorch's (HF ``LlamaRMSNorm``,
    ``T5LayerNorm``, timm ``LayerNorm2d`` and ``BatchNormAct2d``, a user's ``MyRMSNorm``): the class
    name must *end* in ``Norm``, optionally followed by ``alization``, ``Act`` and a dimension
    suffix such as ``2d``. ``Normalize``, ``Normalizer`` or ``NormBlock`` do not match.

    Only the parameters registered directly on such a module are excluded, never those of its
    children. Remove this predicate from ``no_decay_module_types`` to switch the rule off.

    Examples:
        >>> from torch import nn
        >>> class LlamaRMSNorm(nn.Module): ...
        >>> class Normalize(nn.Module): ...
        >>> norm_by_class_name(LlamaRMSNorm()), norm_by_class_name(Normalize())
        (True, False)
    """
    return _is_norm_class_name(type(module).__name__)


@cache
def _is_norm_class_name(name: str) -> bool:
    return _NORM_CLASS_NAME.search(name) is not None


_TORCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, their lazy forms
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

#: Module rules excluded by default: every normalization layer of ``torch.nn``, ``nn.PReLU``, and
#: custom norm classes recognised by :func:`norm_by_class_name`.
DEFAULT_NO_DECAY_MODULE_TYPES: tuple[ModuleRule, ...] = (
    *_TORCH_NORM_TYPES,
    nn.PReLU,
    norm_by_class_name,
)

#: Name patterns excluded by default: any parameter whose own name is ``bias`` or ends in ``_bias``
#: (``nn.MultiheadAttention.in_proj_bias``, BEiT's ``q_bias``).
DEFAULT_NO_DECAY_PARAM_NAMES: tuple[str, ...] = ("bias", "*_bias")


@dataclass(frozen=True)
class GroupRules:
    """Every declaration that decides a parameter's weight decay, as one value.

    Taken by :func:`~lightning_nodecay.param_groups`, :func:`~lightning_nodecay.decide`, the fine-tuning
    helpers and :class:`~lightning_nodecay.NoDecayMixin` (as its ``group_rules`` attribute, which LightningCLI
    can fill from YAML). Precedence is one rule: every rule that matches a parameter proposes a multiplier
    (exclusions propose ``0``, ``weight_decay_multipliers`` their value) and the **smallest proposal wins**; a
    parameter no rule matches gets ``1``.

    Module types may be given as import paths (``"torch.nn.Embedding"``), so YAML can declare them. In the
    keys of ``weight_decay_multipliers`` and in ``weight_decay_l1``, a string is a name pattern, unless it is
    the import path of an ``nn.Module`` subclass in an already imported package, its last segment capitalised
    (``"torch.nn.Embedding"``).

    Attributes:
        no_decay_module_types: ``nn.Module`` subclasses or predicates ``(module) -> bool`` whose directly-owned
            parameters get no decay. Replaces the defaults; extend them with
            ``DEFAULT_NO_DECAY_MODULE_TYPES + (nn.Embedding,)``.
        no_decay_param_names: name patterns of parameters that get no decay. Replaces the defaults.
        weight_decay_multipliers: ``{pattern or module type: multiplier}`` of the base decay, for decay other
            than 0 or 1, e.g. ``{"head.**": 2.0, nn.Embedding: 0.1}``.
        weight_decay_l1: patterns or module types whose *decayed* parameters get an L1 penalty (strength: their
            multiplier x the base decay) instead of L2; excluded parameters stay excluded.
        lr_multipliers: ``{pattern or module type: multiplier}`` of the base learning rate, e.g.
            ``{"head.**": 10.0, nn.Embedding: 0.5}``. A parameter matched by two of them is an error.
        layer_decay: layer-wise learning-rate decay: a parameter in layer ``i`` of ``n`` gets
            ``layer_decay ** (n - 1 - i)`` times the base learning rate (times its ``lr_multipliers`` value).
            Layers come from ``layer_ids``, else the model's ``group_matcher()`` (timm), else its block list
            (``blocks``, ``layers``, ``layer`` or ``h``; see ``docs/lr.md``).
        layer_ids: the model's own layer ids: ``{name pattern: layer id}`` (first match wins), or a callable
            ``(name) -> layer id`` (or its import path), counting from 0 at the input.
        weight_decay_toward: where decay pulls the decayed parameters (L2-SP, Li et al. 2018, when not zero):

            * ``"zero"`` (the default): plain weight decay;
            * ``"initial"``: toward their values at fit start (or when a fine-tuning callback unfreezes them);
            * ``{pattern or module type: "initial" | "zero"}``: per rule, e.g. ``{"backbone.**": "initial"}``
              (unmatched parameters: toward zero); give each side its strength with ``weight_decay_multipliers``;
            * a reference state dict ``{name: tensor}`` (e.g. the pretrained ``state_dict()``), or the path of a
              file holding one (a Lightning checkpoint's ``state_dict`` is taken): the parameters it names are
              pulled toward its tensors, the others toward zero.

            Excluded parameters stay excluded. The step hook applies the pull
            (:func:`~lightning_nodecay.attach_weight_decay_hook`) and keeps one reference copy per parameter.
        strict: raise when a declared name pattern (not a default one) matches no parameter of the model.

    Raises:
        TypeError: a rule of the wrong type, naming it and the fix.
        ValueError: a malformed pattern, a negative or infinite multiplier, an import path that does not resolve.

    Examples:
        >>> from torch import nn
        >>> rules = GroupRules(
        ...     no_decay_module_types=DEFAULT_NO_DECAY_MODULE_TYPES + ("torch.nn.Embedding",),
        ...     weight_decay_multipliers={"head.*": 2.0},
        ... )
        >>> rules.no_decay_module_types[-1] is nn.Embedding
        True
    """

    no_decay_module_types: Sequence[ModuleRule | str] = DEFAULT_NO_DECAY_MODULE_TYPES
    no_decay_param_names: Sequence[str] = DEFAULT_NO_DECAY_PARAM_NAMES
    weight_decay_multipliers: Mapping[RuleKey, float] = field(default_factory=dict)
    weight_decay_l1: Sequence[RuleKey] = ()
    lr_multipliers: Mapping[RuleKey, float] = field(default_factory=dict)
    layer_decay: float | None = None
    layer_ids: LayerIds | None = None
    weight_decay_toward: TowardRules = "zero"
    strict: bool = True

    def __post_init__(self) -> None:
        _set = object.__setattr__  # normalise once: a frozen dataclass
        _set(self, "no_decay_module_types", check_module_rules(self.no_decay_module_types))
        _set(self, "no_decay_param_names", check_patterns(self.no_decay_param_names, "no_decay_param_names"))
        _set(self, "weight_decay_multipliers", _check_multipliers(self.weight_decay_multipliers))
        _set(self, "weight_decay_l1", _check_l1(self.weight_decay_l1))
        _set(self, "lr_multipliers", _check_multipliers(self.lr_multipliers, "lr_multipliers"))
        _set(self, "layer_decay", _check_layer_decay(self.layer_decay))
        _set(self, "layer_ids", _check_layer_ids(self.layer_ids))
        _set(self, "weight_decay_toward", _check_toward(self.weight_decay_toward))
        if not isinstance(self.strict, bool):
            raise TypeError(f"`strict` must be True or False; got {self.strict!r}.")


def check_module_rules(rules: object, argument: str = "no_decay_module_types") -> tuple[ModuleRule, ...]:
    """Validate module rules: ``nn.Module`` subclasses, predicates ``(module) -> bool``, or their import paths.

    Raises:
        TypeError: naming the offending entry and how to fix it.
    """
    if isinstance(rules, (type, nn.Module, str)) or not isinstance(rules, Iterable):
        raise TypeError(
            f"`{argument}` must be a tuple or list of `nn.Module` subclasses, got {rules!r}."
            f" Wrap a single type in a tuple: `({getattr(rules, '__name__', rules)},)`."
        )
    return tuple(_check_module_rule(rule, f"{argument}[{i}]") for i, rule in enumerate(rules))


def _check_module_rule(rule: object, where: str) -> ModuleRule:
    if isinstance(rule, str) and "." in rule:
        rule = _import_path(rule, where)
    if isinstance(rule, type):
        if not issubclass(rule, nn.Module):
            raise TypeError(
                f"`{where}` is `{rule.__name__}`, which is not an `nn.Module` subclass. List module classes"
                " such as `nn.LayerNorm`; exclude parameters by name with `no_decay_param_names`."
            )
        return rule
    if isinstance(rule, nn.Module):
        raise TypeError(f"`{where}` is a module instance ({rule!r}); pass its class `{type(rule).__name__}` instead.")
    if not callable(rule) or isinstance(rule, str):
        raise TypeError(
            f"`{where}` is {rule!r} of type `{type(rule).__name__}`; entries must be `nn.Module` subclasses"
            " (e.g. `nn.LayerNorm`), predicates `(module) -> bool`, or their full import paths"
            " (`'torch.nn.LayerNorm'`); exclude parameters by name with `no_decay_param_names`."
        )
    return rule


def _import_path(path: str, where: str) -> object:
    """The object at import path ``path`` (``"torch.nn.Embedding"``), or a clear error."""
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"`{where}` is {path!r}, which is not an importable class or function ({error}). Give a full import"
            " path such as `'torch.nn.Embedding'`, or the class itself."
        ) from None


def _as_rule_key(key: object, argument: str) -> RuleKey:
    """A module rule for a non-string key or a module-class import path; the pattern itself otherwise."""
    if not isinstance(key, str):
        return _check_module_rule(key, argument)
    return _module_class_path(key) or key


def _module_class_path(key: str) -> type[nn.Module] | None:
    """The ``nn.Module`` subclass that ``key`` is the import path of (last segment capitalised), else ``None``."""
    module_name, _, attribute = key.rpartition(".")
    if not module_name or not attribute[:1].isupper() or not all(s.isidentifier() for s in key.split(".")):
        return None
    if module_name.partition(".")[0] not in sys.modules:  # never import a package for a name pattern
        return None
    try:
        found = getattr(importlib.import_module(module_name), attribute, None)
    except ImportError:
        return None
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def _check_multipliers(multipliers: object, argument: str = "weight_decay_multipliers") -> dict[RuleKey, float]:
    if not isinstance(multipliers, Mapping):
        raise TypeError(
            f"`{argument}` must be a dict mapping name patterns or module types to floats, e.g."
            f" `{{'head.*': 2.0, nn.Embedding: 0.1}}`; got {multipliers!r}."
        )
    lr = argument == "lr_multipliers"
    checked: dict[RuleKey, float] = {}
    for key, value in multipliers.items():
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not number or value < 0 or (lr and value == 0):
            meaning = (
                "> 0 (1 = the optimizer's `lr`; freeze a parameter with `requires_grad_(False)` instead of 0)"
                if lr
                else ">= 0 (0 = no decay, 1 = the optimizer's `weight_decay`)"
            )
            raise ValueError(f"`{argument}[{key!r}]` is {value!r}; a multiplier must be a finite float {meaning}.")
        rule = _as_rule_key(key, f"{argument}[{key!r}]")
        if isinstance(rule, str):
            check_patterns((rule,), argument)
        checked[rule] = float(value)
    return checked


def _check_layer_decay(layer_decay: object) -> float | None:
    if layer_decay is None:
        return None
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
        raise ValueError(
            f"`layer_decay` is {layer_decay!r}; it must be a float in (0, 1], e.g. 0.75: each layer below the top gets"
            " that factor of the learning rate of the layer above it."
        )
    return float(layer_decay)


def _check_layer_ids(layer_ids: object) -> LayerIds | None:
    if isinstance(layer_ids, str):
        layer_ids = _import_path(layer_ids, "layer_ids")
    if layer_ids is None or isinstance(layer_ids, Mapping) or callable(layer_ids):
        return layer_ids  # its entries are checked when the layers are assigned
    raise TypeError(
        f"`layer_ids` must be a dict `{{name pattern: layer id}}` or a callable `(name) -> layer id`; got"
        f" {layer_ids!r} of type `{type(layer_ids).__name__}`."
    )


def _check_l1(rules: object) -> tuple[RuleKey, ...]:
    if isinstance(rules, (str, type)) or not isinstance(rules, Iterable):
        raise TypeError(
            "`weight_decay_l1` must be a tuple of name patterns or module types whose parameters get an L1"
            f" penalty, e.g. `('head.*', nn.Embedding)`; got {rules!r}. Wrap a single rule in a tuple."
        )
    checked = tuple(_as_rule_key(rule, f"weight_decay_l1[{i}]") for i, rule in enumerate(rules))
    check_patterns([r for r in checked if isinstance(r, str)], "weight_decay_l1")
    return checked


_TARGETS: tuple[Toward, ...] = ("zero", "initial")


def _check_toward(toward: object) -> TowardRules:
    """``"zero"``, ``"initial"``, ``{rule key: target}`` or ``{name: tensor}``, from any accepted form."""
    if isinstance(toward, str) and toward not in _TARGETS:
        toward = _load_reference(toward)
    if isinstance(toward, str):
        return toward
    if not isinstance(toward, Mapping) or not toward:
        raise TypeError(
            "`weight_decay_toward` must be 'zero', 'initial', a non-empty dict `{pattern or module type: 'initial' |"
            f" 'zero'}}`, or a reference state dict `{{name: tensor}}`; got {toward!r}."
        )
    if all(isinstance(value, Tensor) for value in toward.values()):
        return {str(name): value for name, value in toward.items()}
    checked: dict[RuleKey, str] = {}
    for key, target in toward.items():
        if target not in _TARGETS:
            raise ValueError(
                f"`weight_decay_toward[{key!r}]` is {target!r}; a rule's target is 'initial' (the weights at fit start)"
                " or 'zero'. A reference state dict must map every name to a tensor."
            )
        rule = _as_rule_key(key, f"weight_decay_toward[{key!r}]")
        if isinstance(rule, str):
            check_patterns((rule,), "weight_decay_toward")
        checked[rule] = target
    return checked


def _load_reference(path: str) -> Mapping[str, Tensor]:
    """The reference state dict in the file at ``path`` (a Lightning checkpoint's ``state_dict``)."""
    if not Path(path).is_file():
        raise ValueError(
            f"`weight_decay_toward` is {path!r}: neither 'zero', 'initial' nor an existing file holding a reference"
            " state dict (`torch.save(model.state_dict(), path)` or a Lightning checkpoint)."
        )
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"`weight_decay_toward` file {path!r} holds no state dict `{{name: tensor}}`.")
    return state


def split_module_rules(rules: Sequence[ModuleRule]) -> tuple[tuple[type[nn.Module], ...], tuple[ModulePredicate, ...]]:
    """Separate module classes (checked with one ``isinstance``) from predicates."""
    types = tuple(r for r in rules if isinstance(r, type))
    predicates = tuple(r for r in rules if not isinstance(r, type))
    return types, predicates


def rule_label(rule: ModuleRule) -> str:
    """A short human-readable label of a module rule, for summaries."""
    return getattr(rule, "__name__", repr(rule))
