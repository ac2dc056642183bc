"""Layer ids for layer-wise learning-rate decay (LLRD): which layer, counted from the input, each parameter is in.

Pure PyTorch. :func:`assign_layers` gives every parameter an integer layer id from the first source
that applies, and that source decides for the whole model:

1. **Declared** by the caller: a mapping ``{name pattern: layer id}`` (first matching pattern wins)
   or a callable ``(name) -> layer id | None``. It must cover every trainable parameter.
2. **timm's** ``group_matcher(coarse=False)`` method on the model, with the ids timm's
   ``param_groups_layer_decay`` gives (see :func:`assign_layers`).
3. **A block list**, found automatically: the first ``nn.ModuleList`` or ``nn.Sequential`` (in
   ``named_modules()`` order) named ``blocks``, ``layers``, ``layer`` or ``h`` that holds parameters.

Names are those of ``named_parameters()`` (tied parameters under their first name) with wrapper
segments (``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``, ``_orig_mod``, ``_forward_module``)
dropped, relative to the model inside pure wrappers (DDP's ``module``, Fabric's ``_forward_module``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lightning_nodecay._naming import clean_name, unwrap
from lightning_nodecay._patterns import NamePatterns
from lightning_nodecay.rules import LayerIds

Origin = Literal["declared", "group_matcher", "blocks"]

_BLOCK_LIST_NAMES = ("blocks", "layers", "layer", "h")
_MATCH_PREV_GROUP = 99999  # timm's `MATCH_PREV_GROUP[0]`: an ordinal key ending in it joins the previous layer

_OrdinalKey = tuple[float, ...]
_Rule = tuple[re.Pattern[str], _OrdinalKey, _OrdinalKey]  # (regex, (group position,), suffix)


@dataclass(frozen=True)
class LayerAssignment:
    """The layer id of each parameter, and where it came from.

    Attributes:
        ids: ``{cleaned parameter name: layer id}``, ``0`` nearest the input. Every parameter has
            one, except frozen parameters a declared source does not cover.
        num_layers: the largest id plus one.
        sources: ``{cleaned parameter name: why it has its id}``, for a summary table, e.g.
            ``"declared `blocks.0.**`"``, ``"group_matcher `^blocks\\.(\\d+)`"``, ``"block `blocks.3`"``.
        origin: the source that decided: ``"declared"``, ``"group_matcher"`` or ``"blocks"``.
    """

    ids: dict[str, int]
    num_layers: int
    sources: dict[str, str]
    origin: Origin

    def scale(self, name: str, decay: float) -> float:
        """Return the learning-rate factor of parameter ``name``: ``decay ** (num_layers - 1 - id)``.

        The last layer gets ``1``, each layer below it one more factor ``decay``.

        Raises:
            KeyError: if ``name`` has no layer id.
        """
        return self.scales(decay)[self.ids[name]]

    def scales(self, decay: float) -> list[float]:
        """The learning-rate factor of each layer id: ``decay ** (num_layers - 1 - id)``."""
        return [decay ** (self.num_layers - 1 - layer) for layer in range(self.num_layers)]


def assign_layers(
    module: nn.Module, declared: LayerIds | None = None, trainable: Sequence[str] | None = None
) -> LayerAssignment:
    """Give every parameter of ``module`` a layer id, from the first source that applies.

    * ``declared`` (when not ``None``): pattern keys are matched against the cleaned name, first
      match wins. A pattern without a dot matches the parameter's own name (``"cls_token"``); one
      with dots matches the whole name segment by segment, ``*`` within one segment and ``**``
      any number of segments (``"blocks.0.**"``, ``"**.cls_token"``). A callable returns ``None``
      for a parameter it does not cover. Every trainable parameter must be covered.
    * ``module.group_matcher(coarse=False)``, timm's convention, reproducing timm's
      ``param_groups_layer_decay``: each parameter gets an ordinal key, the position of the first
      matcher group with a matching regex (``re.match``, groups and regexes in order) followed by
      the regex's capture groups as numbers and the rule's suffix tuple, e.g. ``(1, 3)`` for
      ``blocks.3.*`` under ``blocks=[(r"^blocks\\.(\\d+)", None)]``; unmatched parameters share the
      key ``(inf,)``. Sorted distinct keys get consecutive ids, except that a key ending in
      ``99999`` (timm's ``MATCH_PREV_GROUP``) joins the previous id. So parameters with equal
      keys share an id, and unmatched ones (the head) form the last layer. A callable matcher
      gives the key itself (a number or a tuple of numbers). Extension: a group's list may hold
      plain regex strings as well as ``(regex, suffix)`` pairs (timm itself fails on them).
    * A block list of depth ``n`` (its number of children): a parameter inside child ``i`` gets
      ``i + 1``; one before the list in ``named_parameters()`` order (embeddings, ``cls_token``,
      ``pos_embed``) gets ``0``, one after it (final norm, head, pooler) gets ``n + 1``. With a
      head this is ``n + 2`` layers and equals MAE/BEiT's ``get_layer_id_for_vit`` on a ViT.

    Args:
        module: the model; pure wrappers around it are looked through.
        declared: the model's own declaration of layer ids, if any.
        trainable: the cleaned names of the trainable parameters, in ``named_parameters()`` order, when the
            caller has them (``decide``): then only these get ids, and the parameters are not walked again.

    Returns:
        The ids, ``num_layers`` (largest id plus one, so the top layer that has parameters gets
        scale ``1``), and each parameter's source.

    Raises:
        ValueError: if no source applies, a declaration leaves a trainable parameter uncovered or
            gives an id that is not a non-negative int, or ``group_matcher()`` returns something
            timm's rule cannot order.

    Examples:
        >>> from torch import nn
        >>> blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        >>> model = nn.ModuleDict({"embed": nn.Linear(4, 8), "blocks": blocks, "head": nn.Linear(8, 2)})
        >>> layers = assign_layers(model)
        >>> layers.num_layers, layers.ids["embed.weight"], layers.ids["blocks.1.bias"], layers.ids["head.weight"]
        (4, 0, 2, 3)
        >>> layers.sources["blocks.1.bias"], layers.sources["head.weight"], layers.scale("embed.weight", 0.5)
        ('block `blocks.1`', 'after `blocks`', 0.125)
        >>> assign_layers(model, {"embed.**": 0, "*": 1}).ids["blocks.1.bias"]
        1
    """
    root = unwrap(module)
    if trainable is None:
        named = [(clean_name(name), param.requires_grad) for name, param in root.named_parameters()]
    else:
        named = [(name, True) for name in trainable]
    if not named:
        raise ValueError(f"`{type(root).__name__}` has no parameters, so it has no layers to decay.")
    if declared is not None:
        return _from_declared(named, declared)
    names = [name for name, _ in named]
    group_matcher = getattr(root, "group_matcher", None)
    if callable(group_matcher):
        return _from_group_matcher(group_matcher(coarse=False), names, type(root).__name__)
    block_list = _find_block_list(root)
    if block_list is None:
        raise ValueError(_no_source_message(type(root).__name__))
    return _from_block_list(names, *block_list)


def _assignment(ids: dict[str, int], sources: dict[str, str], origin: Origin) -> LayerAssignment:
    return LayerAssignment(ids, max(ids.values(), default=-1) + 1, sources, origin)


# -- 1. declared ---------------------------------------------------------------------------------


def _from_declared(named: list[tuple[str, bool]], declared: LayerIds) -> LayerAssignment:
    lookup = _declared_lookup(declared)
    ids: dict[str, int] = {}
    sources: dict[str, str] = {}
    uncovered = []
    for name, trainable in named:
        hit = lookup(name)
        if hit is not None:
            ids[name], sources[name] = hit
        elif trainable:
            uncovered.append(name)
    if uncovered:
        raise ValueError(_uncovered_message(uncovered, isinstance(declared, Mapping)))
    return _assignment(ids, sources, "declared")


def _declared_lookup(declared: LayerIds) -> Callable[[str], tuple[int, str] | None]:
    """A function ``name -> (layer id, source)`` or ``None`` when ``declared`` does not cover the name."""
    if isinstance(declared, Mapping):
        rules = [
            (NamePatterns((pattern,), "layer_ids"), _checked_id(layer_id, f"pattern `{pattern}`"), pattern)
            for pattern, layer_id in _checked_patterns(declared)
        ]

        def from_mapping(name: str) -> tuple[int, str] | None:
            for patterns, layer_id, pattern in rules:
                if patterns.match(name):
                    return layer_id, f"declared `{pattern}`"
            return None

        return from_mapping
    if not callable(declared):
        raise ValueError(
            f"Declared layer ids must be a mapping `{{name pattern: layer id}}` or a callable"
            f" `(name) -> layer id | None`; got {declared!r} of type `{type(declared).__name__}`."
        )

    def from_callable(name: str) -> tuple[int, str] | None:
        layer_id = declared(name)
        return None if layer_id is None else (_checked_id(layer_id, f"the callable's answer for `{name}`"), "declared")

    return from_callable


def _checked_patterns(declared: Mapping[str, int]) -> Iterator[tuple[str, int]]:
    for pattern, layer_id in declared.items():
        if not isinstance(pattern, str) or not pattern or "" in pattern.split("."):
            raise ValueError(
                f"Declared layer-id pattern {pattern!r} is not a name pattern; use strings such as"
                " `'blocks.0.**'` or `'**.cls_token'` (`*`: within one segment, `**`: any number of segments)."
            )
        yield pattern, layer_id


def _checked_id(layer_id: object, what: str) -> int:
    if isinstance(layer_id, bool) or not isinstance(layer_id, int) or layer_id < 0:
        raise ValueError(
            f"Declared layer id of {what} is {layer_id!r}; layer ids must be non-negative ints,"
            " `0` for the layer nearest the input."
        )
    return layer_id


def _uncovered_message(uncovered: list[str], mapping: bool) -> str:
    shown = ", ".join(f"`{name}`" for name in uncovered[:5])
    more = f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else ""
    fix = (
        "add a pattern for them, e.g. a final `'*': <id>` entry (a pattern without a dot matches the"
        " parameter's own name, so `'*'` matches every parameter not matched before)"
        if mapping
        else "make the callable return an id for them (it returned `None`)"
    )
    return (
        f"The declared layer ids give no id to the trainable parameter(s) {shown}{more}. Layer-wise"
        f" learning-rate decay needs an id for every trainable parameter: {fix}."
    )


# -- 2. timm's group_matcher -----------------------------------------------------------------------


def _from_group_matcher(matcher: object, names: list[str], owner: str) -> LayerAssignment:
    """Ids as timm's ``group_parameters(model, matcher, reverse=True)`` gives them (adapted from timm, Apache-2.0)."""
    if isinstance(matcher, Mapping):
        rules = list(_compile_rules(matcher, owner))
        keyed = {name: _rule_key(rules, name, owner) for name in names}
    elif callable(matcher):
        keyed = {name: (_callable_key(matcher(name), name, owner), "group_matcher (callable)") for name in names}
    else:
        raise ValueError(
            f"`{owner}.group_matcher(coarse=False)` returned {matcher!r} of type `{type(matcher).__name__}`;"
            " timm's convention is a dict `{group name: regex or [(regex, suffix tuple or None), ...]}`"
            " or a callable `(name) -> ordinal`."
        )
    layer_of = _layer_ids_of_keys({key for key, _ in keyed.values()})
    ids = {name: layer_of[key] for name, (key, _) in keyed.items()}
    return _assignment(ids, {name: source for name, (_, source) in keyed.items()}, "group_matcher")


def _compile_rules(matcher: Mapping[object, object], owner: str) -> Iterator[_Rule]:
    """timm's compiled matcher: a group's position counts groups whose spec is ``None`` too."""
    for position, (group, spec) in enumerate(matcher.items()):
        if spec is None:
            continue
        for entry in spec if isinstance(spec, (list, tuple)) else [spec]:
            regex, suffix = _rule_entry(entry, f"`{owner}.group_matcher()` group `{group}`")
            yield regex, (float(position),), suffix


def _rule_entry(entry: object, where: str) -> tuple[re.Pattern[str], _OrdinalKey]:
    if isinstance(entry, (str, re.Pattern)):
        return _compile_regex(entry, where), ()
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (str, re.Pattern)):
        suffix = entry[1]
        if suffix is None:
            return _compile_regex(entry[0], where), ()
        if isinstance(suffix, (list, tuple)) and all(_is_number(x) for x in suffix):
            return _compile_regex(entry[0], where), tuple(float(x) for x in suffix)
    raise ValueError(
        f"{where} has entry {entry!r}; each entry must be a regex or a pair `(regex, suffix)` whose"
        " suffix is `None` or a tuple of numbers such as `(99999,)`."
    )


def _compile_regex(regex: str | re.Pattern[str], where: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as error:
        raise ValueError(f"{where} has an invalid regex {regex!r}: {error}.") from None


def _rule_key(rules: list[_Rule], name: str, owner: str) -> tuple[_OrdinalKey, str]:
    for regex, position, suffix in rules:
        match = regex.match(name)
        if match:
            return (*position, *_captured_numbers(match, name, owner), *suffix), f"group_matcher `{regex.pattern}`"
    return (math.inf,), "group_matcher: no match, last layer"


def _captured_numbers(match: re.Match[str], name: str, owner: str) -> _OrdinalKey:
    try:
        return tuple(float(group) for group in match.groups())  # an unmatched group (None) fails too
    except (TypeError, ValueError):
        raise ValueError(
            f"`{owner}.group_matcher()` regex `{match.re.pattern}` captured {match.groups()!r} from `{name}`;"
            r" timm orders by every capture group as a number, so capture digits only, e.g. `(\d+)`,"
            " and make other groups non-capturing: `(?:...)`."
        ) from None


def _callable_key(ordinal: object, name: str, owner: str) -> _OrdinalKey:
    parts = tuple(ordinal) if isinstance(ordinal, (list, tuple)) else (ordinal,)
    if not parts or not all(_is_number(part) for part in parts):
        raise ValueError(
            f"`{owner}.group_matcher()` returned a callable that gave {ordinal!r} for `{name}`; it must give"
            " a number or a non-empty tuple of numbers, e.g. `(1, 3)` for block 3."
        )
    return tuple(float(part) for part in parts)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _layer_ids_of_keys(keys: set[_OrdinalKey]) -> dict[_OrdinalKey, int]:
    """timm's remapping: sorted keys get consecutive ids; one ending in ``99999`` keeps the previous id."""
    layer_of: dict[_OrdinalKey, int] = {}
    layer_id = -1
    for key in sorted(keys):
        if layer_id < 0 or key[-1] != _MATCH_PREV_GROUP:
            layer_id += 1
        layer_of[key] = layer_id
    return layer_of


# -- 3. block list ---------------------------------------------------------------------------------


def _find_block_list(root: nn.Module) -> tuple[str, dict[str, int], int] | None:
    """``(cleaned name, {child name: position}, depth)`` of the first block list holding parameters."""
    for name, sub in root.named_modules():
        cleaned = clean_name(name)
        if (
            isinstance(sub, (nn.ModuleList, nn.Sequential))
            and cleaned.rpartition(".")[2] in _BLOCK_LIST_NAMES
            and next(sub.parameters(), None) is not None
        ):
            return cleaned, {child: i for i, child in enumerate(sub._modules)}, len(sub)
    return None


def _from_block_list(names: Sequence[str], list_name: str, positions: dict[str, int], depth: int) -> LayerAssignment:
    prefix = f"{list_name}."
    blocks = {child: (position + 1, f"block `{prefix}{child}`") for child, position in positions.items()}
    before, beyond = (0, f"before `{list_name}`"), (depth + 1, f"after `{list_name}`")
    ids: dict[str, int] = {}
    sources: dict[str, str] = {}
    after = False
    for name in names:
        block = blocks.get(name[len(prefix) :].partition(".")[0]) if name.startswith(prefix) else None
        if block is not None:
            after = True
        ids[name], sources[name] = block or (beyond if after else before)
    return _assignment(ids, sources, "blocks")


def _no_source_message(owner: str) -> str:
    *first, last = (f"`{name}`" for name in _BLOCK_LIST_NAMES)
    lists = f"{', '.join(first)} or {last}"
    return (
        f"Layer-wise learning-rate decay needs a layer id for every parameter of `{owner}` and found no"
        f" source: no declared layer ids, no `group_matcher()` method (timm's convention), and no"
        f" `nn.ModuleList` or `nn.Sequential` named {lists} holding parameters. Declare the ids (a mapping"
        " such as `{'embed.**': 0, 'blocks.0.**': 1, 'blocks.1.**': 2, '*': 3}` or a callable"
        " `(name) -> layer id`), add a timm-style `group_matcher(coarse=False)`, or keep the model's"
        " blocks in an `nn.ModuleList` named `blocks` or `layers`."
    )
