"""Misspelled hyper-parameter names: an unknown constructor keyword is an error naming the closest
valid one (``strict``); a param-group key one edit away from a hyper-parameter is a warning (torch
allows extra keys in a group)."""

import difflib
import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable
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


def keywords(cls: type, init: Callable) -> list[str]:
    """The keywords the constructors of ``cls`` take, from the base whose ``__init__`` is ``init`` down."""
    mro = cls.__mro__
    owner = next(i for i, c in enumerate(mro) if vars(c).get("__init__") is init)
    names: dict[str, None] = {}
    for c in reversed(mro[: owner + 1]):
        if "__init__" in vars(c):
            for name, p in inspect.signature(vars(c)["__init__"]).parameters.items():
                if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                    names[name] = None
    return list(names)


def strict(init: Callable) -> Callable:
    """Decorator of an optimizer's ``__init__``: an unknown keyword raises ``unknown_keyword`` (listing
    what the constructors of the object's class take, subclasses' included); the signature is kept."""
    own = inspect.signature(init).parameters

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in own]
        if unknown:
            raise unknown_keyword(type(self).__name__, unknown[0], keywords(type(self), checked))
        init(self, *args, **kwargs)

    return checked


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
