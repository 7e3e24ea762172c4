"""Freeze parameters by name pattern (fine-tuning: train only the experts, freeze the router, ...)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

REGEX_PREFIX = "re:"


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX):], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def freeze_by_pattern(module: nn.Module, patterns: Sequence[str], *, owner: str = "freeze") -> list[str]:
    """Set ``requires_grad=False`` on the parameters of ``module`` that ``patterns`` freeze.

    Each pattern is a shell-style glob over the parameter's name in ``module.named_parameters()``
    (``"*.attn.*"``, ``"blocks.0.*"``), or a regular expression after ``re:`` (``"re:blocks\\.[0-3]\\..*"``),
    matched against the whole name. A pattern starting with ``!`` unfreezes what it matches. The
    last pattern that matches a name decides, as in ``.gitignore``: ``["*", "!*.experts.*"]`` trains
    only the routed experts; ``["*.gate.weight"]`` freezes every router.

    Args:
        module: the model.
        patterns: the patterns, in order.
        owner: the name errors start with.

    Returns:
        The names of the frozen parameters.

    Raises:
        ValueError: a pattern matches no parameter (a typo would otherwise freeze nothing), or a
            regular expression does not compile.
    """
    names = [name for name, _ in module.named_parameters()]
    for pattern in patterns:
        body = pattern[1:] if pattern.startswith("!") else pattern
        if body.startswith(REGEX_PREFIX):
            try:
                re.compile(body[len(REGEX_PREFIX):])
            except re.error as error:
                raise ValueError(f"{owner}: pattern {pattern!r} is not a valid regular expression ({error}).") from None
        if not any(_matches(body, name) for name in names):
            tied = [f"`{alias}` is `{name}`" for alias, name in _tied_aliases(module).items() if _matches(body, alias)]
            if tied:
                raise ValueError(
                    f"{owner}: pattern {pattern!r} names only tied parameters ({', '.join(tied)}: the same tensor, "
                    f"listed under its first name). Name the first one instead."
                )
            examples = ", ".join(names[:4] + (["..."] if len(names) > 4 else []))
            raise ValueError(
                f"{owner}: pattern {pattern!r} matches no parameter. Names look like {examples}; globs must match "
                f"the whole name (use '*' at either end, e.g. '*.attn.*')."
            )
    frozen = []
    for name, parameter in module.named_parameters():
        decision = None
        for pattern in patterns:
            negated = pattern.startswith("!")
            if _matches(pattern[1:] if negated else pattern, name):
                decision = not negated
        if decision is not None:
            parameter.requires_grad_(not decision)
        if not parameter.requires_grad:
            frozen.append(name)
    return frozen


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """Second names of shared parameters (``lm_head.weight`` with tied embeddings) -> their first name,
    the one ``named_parameters()`` lists."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases
