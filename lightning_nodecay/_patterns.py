"""Parameter-name patterns: segment-wise globs matched against cleaned qualified names. Pure Python."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache


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

    Examples:
        >>> patterns = NamePatterns(["bias", "encoder.*.pos_embed"])
        >>> [patterns.match(n) for n in ["fc.bias", "encoder.s1.pos_embed", "encoder.s1.x.pos_embed"]]
        ['bias', 'encoder.*.pos_embed', None]
    """

    def __init__(self, patterns: object, argument: str = "no_decay_param_names") -> None:
        self.patterns = check_patterns(patterns, argument)
        self._literal_leaf = {p: p for p in self.patterns if "." not in p and not _is_glob(p)}
        self._glob_leaf = [(p, _compile(p)) for p in self.patterns if "." not in p and _is_glob(p)]
        self._qualified = [(p, _compile(p)) for p in self.patterns if "." in p]
        self._qualified_last = [_last_segment_regex(p) for p in self.patterns if "." in p]

    def decided_by_leaf(self, leaf: str) -> bool:
        """Tell whether every name whose own name is ``leaf`` gets the same match, whatever its prefix.

        A dotted pattern only matches names whose own name matches its last segment; a last segment
        that may match anything (``**``, or a character class such as ``[!x]``, which may match a
        dot) makes every ``leaf`` depend on its prefix.

        Examples:
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


def check_patterns(patterns: object, argument: str) -> tuple[str, ...]:
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
    if segments == ["**"]:  # as an own-name pattern: any own name
        return re.compile(r"[^.]*")
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
