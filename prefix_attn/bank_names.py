"""Entry names: the check of a new name and the words of an unknown one's error (a close name
suggested, a long list of names shortened)."""
from __future__ import annotations

import difflib


def check_name(name) -> str:
    """An entry name: a non-empty str (TypeError otherwise)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"entry name must be a non-empty str, got {name!r}")
    return name


# Beyond this many names a typo is looked for in their case only: difflib over a bank of
# 50,000 tenants took half a second of a request's time.
_FUZZY_NAMES_MAX = 2000


def did_you_mean(name, known) -> str:
    """ "; did you mean 'x'?" for a name close to one of ``known`` (a typo), else ""."""
    if not isinstance(name, str):
        return ""
    lowered = {k.lower(): k for k in known if isinstance(k, str)}
    if name.lower() in lowered:
        return f"; did you mean {lowered[name.lower()]!r}?"
    if len(lowered) > _FUZZY_NAMES_MAX:
        return ""
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


def some_names(names, at_most: int = 20) -> str:
    """``names`` for an error message: all of a small bank's, the first ``at_most`` and a count
    of a large one's (a message listing 50,000 tenants was 850 KB, and showed them all)."""
    names = list(names)
    if len(names) <= at_most:
        return repr(names)
    return f"{names[:at_most]!r} and {len(names) - at_most} more"
