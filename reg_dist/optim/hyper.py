"""Hyper-parameters: each algorithm's constructor, made from its list of them (``constructor``), and
misspelled names: an unknown constructor keyword is an error naming the closest valid one; a
param-group key one edit away from a hyper-parameter is a warning (torch allows extra keys in a group)."""

import difflib
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch


# reg_dist/ and torch/ (torch.optim.Optimizer.__init__ calls add_param_group)
PACKAGES = tuple(os.path.dirname(os.path.abspath(f)) for f in (os.path.dirname(__file__), torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` at which the caller's warning points at the first frame outside reg_dist and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGES):
        frame, level = frame.f_back, level + 1
    return level


class UnknownKeywordError(ValueError, TypeError):
    """An unknown constructor keyword: a ``ValueError``, and the ``TypeError`` Python raises for one."""


@dataclass(frozen=True)
class Hyper:
    """One constructor hyper-parameter: its name, default and type."""

    name: str
    default: Any
    type: Any


def constructor(cls: type, common: tuple[Hyper, ...], tail: tuple[Hyper, ...], keyword_only: tuple[Hyper, ...],
                build: Callable) -> Callable:
    """An ``__init__`` for ``cls`` with the signature ``(self, params, *common, *cls.hyper, *tail, *,
    *keyword_only)`` (what ``inspect.signature`` shows, with defaults and types) that calls
    ``build(self, params, values)`` with every other argument by name. An unknown keyword raises
    ``unknown_keyword``."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter("self", kind), inspect.Parameter("params", kind, annotation=Any)]
    parameters += [inspect.Parameter(h.name, kind, default=h.default, annotation=h.type)
                   for h in (*common, *cls.hyper, *tail)]
    parameters += [inspect.Parameter(h.name, inspect.Parameter.KEYWORD_ONLY, default=h.default, annotation=h.type)
                   for h in keyword_only]
    signature = inspect.Signature(parameters)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in signature.parameters]
        if unknown:
            raise unknown_keyword(cls.__name__, unknown[0], list(signature.parameters)[1:])
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["self"]
        build(self, values.pop("params"), values)

    __init__.__signature__ = signature
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = f"{cls.__name__}{str(signature).replace('(self, ', '(', 1)}"
    return __init__


def unknown_keyword(cls_name: str, key: str, valid: Iterable[str]) -> ValueError:
    """The error for keyword ``key`` that ``cls_name`` does not take: the closest valid name, and all of them."""
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    nearest = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = (f" did you mean {close[0]!r}?" if close
            else f" no valid name is close (the closest is {nearest[0]!r})." if nearest else "")
    return UnknownKeywordError(f"{cls_name} got an unknown keyword argument {key!r};{hint} "
                               f"Valid names: {', '.join(valid)}")


def one_edit(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by one insertion, deletion, substitution or swap of neighbours."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def warn_near_misses(group_keys: Iterable[str], valid: Iterable[str]) -> None:
    """Warn for each key of a param group that is not in ``valid`` but one edit from a name that is."""
    valid = set(valid)
    for key in group_keys:
        if isinstance(key, str) and key not in valid:
            near = sorted(v for v in valid if one_edit(key, v))
            if near:
                warnings.warn(f"param group key {key!r} is not a hyper-parameter; did you mean {near[0]!r}? "
                              f"(the key is kept in the group, unused)", UserWarning, stacklevel=user_stacklevel())
