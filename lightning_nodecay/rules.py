"""The rules that decide which parameters are excluded from weight decay.

Pure PyTorch: no Lightning import. Three kinds of rule exist:

* **module types**: every parameter registered *directly* on a module of a listed type (or for
  which a listed predicate returns ``True``) is excluded. Parameters of its child modules are
  judged by their own owner, so a norm layer that holds a ``Linear`` projection does not exclude
  the projection.
* **name patterns**: see :class:`NamePatterns` for the exact semantics.
* **declarations**: a module's own ``no_weight_decay()`` method (the timm/DeiT convention).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from functools import cache, lru_cache
from typing import Union

from torch import nn

ModulePredicate = Callable[[nn.Module], bool]
ModuleRule = Union[type[nn.Module], ModulePredicate]  # noqa: UP007 (a runtime alias)

#: Segments that wrappers insert into parameter names (FSDP1, activation checkpointing,
#: ``torch.compile``). They are removed before name patterns are matched.
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})

_NORM_CLASS_NAME = re.compile(r"Norm(alization)?(Act)?(\d+d?)?$")


def norm_by_class_name(module: nn.Module) -> bool:
    """Tell whether ``module`` is a normalization layer judged by its class name.

    Catches custom norm classes that do not inherit from PyTorch's (HF ``LlamaRMSNorm``,
    ``T5LayerNorm``, timm ``LayerNorm2d`` and ``BatchNormAct2d``, a user's ``MyRMSNorm``): the class
    name must *end* in ``Norm``, optionally followed by ``alization``, ``Act`` and a dimension
    suffix such as ``2d``. ``Normalize``, ``Normalizer`` or ``NormBlock`` do not match.

    Only the parameters registered directly on such a module are excluded, never those of its
    children. Remove this predicate from ``no_decay_module_types`` to switch the rule off.

    Example:
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


def clean_name(name: str) -> str:
    """Remove the segments that wrappers insert into a qualified parameter name.

    Example:
        >>> clean_name("layers._fsdp_wrapped_module.0._orig_mod.norm.weight")
        'layers.0.norm.weight'
    """
    if "_wrapped_module" not in name and "_orig_mod" not in name:
        return name
    return ".".join(s for s in name.split(".") if s not in WRAPPER_SEGMENTS)


def check_module_rules(rules: object, argument: str = "no_decay_module_types") -> tuple[ModuleRule, ...]:
    """Validate module rules: ``nn.Module`` subclasses or predicates ``(module) -> bool``.

    Raises:
        TypeError: naming the offending entry and how to fix it.
    """
    if isinstance(rules, (type, nn.Module)) or not isinstance(rules, Iterable) or isinstance(rules, str):
        raise TypeError(
            f"`{argument}` must be a tuple or list of `nn.Module` subclasses, got {rules!r}."
            f" Wrap a single type in a tuple: `({getattr(rules, '__name__', rules)},)`."
        )
    checked = tuple(rules)
    for i, rule in enumerate(checked):
        if isinstance(rule, type):
            if not issubclass(rule, nn.Module):
                raise TypeError(
                    f"`{argument}[{i}]` is `{rule.__name__}`, which is not an `nn.Module` subclass."
                    " List module classes such as `nn.LayerNorm`; exclude parameters by name with"
                    " `no_decay_param_names`."
                )
        elif isinstance(rule, nn.Module):
            raise TypeError(
                f"`{argument}[{i}]` is a module instance ({rule!r}); pass its class `{type(rule).__name__}` instead."
            )
        elif not callable(rule):
            raise TypeError(
                f"`{argument}[{i}]` is {rule!r} of type `{type(rule).__name__}`; entries must be"
                " `nn.Module` subclasses (e.g. `nn.LayerNorm`) or predicates `(module) -> bool`."
            )
    return checked


def split_module_rules(rules: Sequence[ModuleRule]) -> tuple[tuple[type[nn.Module], ...], tuple[ModulePredicate, ...]]:
    """Separate module classes (checked with one ``isinstance``) from predicates."""
    types = tuple(r for r in rules if isinstance(r, type))
    predicates = tuple(r for r in rules if not isinstance(r, type))
    return types, predicates


def rule_label(rule: ModuleRule) -> str:
    """A short human-readable label of a module rule, for summaries."""
    return getattr(rule, "__name__", repr(rule))


class NamePatterns:
    """Compiled parameter-name patterns.

    Semantics (case-sensitive, anchored at both ends, matched against the *cleaned* qualified
    name: wrapper segments such as ``_fsdp_wrapped_module`` removed):

    * A pattern **without a dot** matches the parameter's own name, the last segment:
      ``"bias"`` matches ``encoder.0.bias`` but not ``bias_scale`` or ``biased.weight``;
      ``"*_bias"`` matches ``attn.in_proj_bias``.
    * A pattern **with a dot** matches the whole qualified name, segment by segment:
      ``*`` matches within one segment, ``**`` matches any number of segments (zero included):
      ``"encoder.*.pos_embed"`` matches ``encoder.stage1.pos_embed``; ``"**.cls_token"`` matches
      ``cls_token`` at any depth.
    * ``?`` matches one character and ``[abc]`` a character class, never a dot.

    Example:
        >>> patterns = NamePatterns(["bias", "encoder.*.pos_embed"])
        >>> [patterns.match(n) for n in ["fc.bias", "encoder.s1.pos_embed", "encoder.s1.x.pos_embed"]]
        ['bias', 'encoder.*.pos_embed', None]
    """

    def __init__(self, patterns: object, argument: str = "no_decay_param_names") -> None:
        self.patterns = _check_patterns(patterns, argument)
        self._literal_leaf = {p: p for p in self.patterns if "." not in p and not _is_glob(p)}
        self._glob_leaf = [(p, _compile(p)) for p in self.patterns if "." not in p and _is_glob(p)]
        self._qualified = [(p, _compile(p)) for p in self.patterns if "." in p]
        self._qualified_last = [_last_segment_regex(p) for p in self.patterns if "." in p]

    def decided_by_leaf(self, leaf: str) -> bool:
        """Tell whether every name whose own name is ``leaf`` gets the same match, whatever its prefix.

        A dotted pattern only matches names whose own name matches its last segment; a last segment
        that may match anything (``**``, or a character class such as ``[!x]``, which may match a
        dot) makes every ``leaf`` depend on its prefix.

        Example:
            >>> patterns = NamePatterns(["bias", "encoder.*.pos_embed"])
            >>> patterns.decided_by_leaf("weight"), patterns.decided_by_leaf("pos_embed")
            (True, False)
        """
        return not any(last is None or last.fullmatch(leaf) for last in self._qualified_last)

    def match(self, name: str, leaf: str | None = None) -> str | None:
        """Return the first pattern matching the cleaned qualified ``name``, or ``None``.

        ``leaf``, the parameter's own name, may be given when the caller knows it already.
        """
        leaf = leaf or name.rpartition(".")[2]
        hit = self._literal_leaf.get(leaf)
        if hit is not None:
            return hit
        for pattern, regex in self._glob_leaf:
            if regex.fullmatch(leaf):
                return pattern
        for pattern, regex in self._qualified:
            if regex.fullmatch(name):
                return pattern
        return None


def _check_patterns(patterns: object, argument: str) -> tuple[str, ...]:
    if isinstance(patterns, str) or not isinstance(patterns, Iterable):
        raise TypeError(
            f"`{argument}` must be a tuple or list of strings, got {patterns!r}."
            f" Wrap a single pattern in a tuple: `({patterns!r},)`."
        )
    checked = tuple(patterns)
    for i, pattern in enumerate(checked):
        if not isinstance(pattern, str):
            hint = " List module classes in `no_decay_module_types` instead." if isinstance(pattern, type) else ""
            raise TypeError(
                f"`{argument}[{i}]` is {pattern!r} of type `{type(pattern).__name__}`; name patterns"
                f" must be strings such as `'bias'` or `'encoder.*.pos_embed'`.{hint}"
            )
        if not pattern or any(not segment for segment in pattern.split(".")):
            raise ValueError(
                f"`{argument}[{i}]` is {pattern!r}, which has an empty segment; use `*` for one"
                " segment or `**` for any number of segments, e.g. `'**.pos_embed'`."
            )
    return checked


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


@lru_cache(maxsize=512)  # once per pattern, not once per grouping
def _last_segment_regex(pattern: str) -> re.Pattern[str] | None:
    """The regex of a dotted pattern's last segment, or ``None`` when it may match any own name."""
    last = pattern.rpartition(".")[2]
    return None if last == "**" or "[" in last else re.compile(_segment_regex(last))


@lru_cache(maxsize=512)  # once per pattern, not once per grouping
def _compile(pattern: str) -> re.Pattern[str]:
    segments = pattern.split(".")
    regex = ""
    for i, segment in enumerate(segments):
        if segment == "**":
            # zero or more whole segments, each followed (or preceded, at the end) by a dot
            if i == 0:
                regex += r"(?:[^.]+\.)*"
            elif i == len(segments) - 1:
                regex += r"(?:\.[^.]+)*"
            else:
                regex += r"\.(?:[^.]+\.)*"
            continue
        if i and segments[i - 1] != "**":
            regex += r"\."
        regex += _segment_regex(segment)
    return re.compile(regex)


def _segment_regex(segment: str) -> str:
    out, i = [], 0
    while i < len(segment):
        c = segment[i]
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[" and "]" in segment[i + 2 :]:
            end = segment.index("]", i + 2)
            body = segment[i + 1 : end].replace("\\", "\\\\")
            # a class never matches the dot between segments: exclude it from negated classes and ranges
            out.append("[^." + body[1:] + "]" if body.startswith("!") else "(?!\\.)[" + body + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)
