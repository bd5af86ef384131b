"""Argument types of the ``bpsim`` command, each written once.

Each function turns one command-line string into a value or raises
``argparse.ArgumentTypeError``; argparse then prints one line that starts
with the flag's name (``argument --timeout: must be a finite number > 0,
got 'nan'``) and exits with code 2. Numbers are refused when they are
NaN, infinite or empty, so a bad value never reaches the library.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from bpsim.files import check_writable

__all__ = ["positive_int", "nonneg_int", "h_steps", "seed", "positive_float", "nonneg_float",
           "positive_floats", "nonneg_floats", "int_list", "slowdown", "slowdowns", "timeout",
           "cpus", "host", "nonempty", "out_file", "out_folder", "one", "MAX_SLOWDOWN",
           "MIN_TIMEOUT", "MAX_TIMEOUT"]

_Bad = argparse.ArgumentTypeError

#: the largest --slowdown factor S (S - 1 times each op's time is spent on extra work)
MAX_SLOWDOWN = 1000.0
#: the range of --timeout, in seconds
MIN_TIMEOUT, MAX_TIMEOUT = 1.0, 1e6


def _int(s: str, lo: int = 0, hi: int | None = None) -> int:
    try:
        v = int(s.strip())
    except ValueError:
        raise _Bad(f"expected an integer, got {s!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise _Bad(f"must be an integer >= {lo}" + ("" if hi is None else f" and <= {hi}")
                   + f", got {v}")
    return v


def _float(s: str, strict: bool) -> float:
    try:
        v = float(s)
    except ValueError:
        raise _Bad(f"expected a number, got {s!r}") from None
    if not (math.isfinite(v) and (v > 0 if strict else v >= 0)):
        raise _Bad(f"must be a finite number {'>' if strict else '>='} 0, got {s!r}")
    return v


def positive_int(s: str) -> int:
    """An integer >= 1."""
    return _int(s, 1)


def nonneg_int(s: str) -> int:
    """An integer >= 0."""
    return _int(s, 0)


def seed(s: str) -> int:
    """A random seed: an integer in [0, 2**32 - 1] (what NumPy and torch both take)."""
    return _int(s, 0, 2 ** 32 - 1)


def h_steps(s: str) -> int:
    """BlockProp's N_h: an integer >= 1 (with 0 the gluing variables would stay at
    the forward activations, every penalty would be 0 and only block K would learn)."""
    v = _int(s, -2 ** 63)
    if v < 1:
        raise _Bad(f"N_h must be an integer >= 1, got {v} (with 0 the h-step never moves the "
                   "gluing variables, so only the last block would learn)")
    return v


def positive_float(s: str) -> float:
    """A finite number > 0."""
    return _float(s, strict=True)


def nonneg_float(s: str) -> float:
    """A finite number >= 0."""
    return _float(s, strict=False)


def _floats(s: str, check: Callable[[str], float]) -> list[float]:
    parts = [p.strip() for p in s.split(",")]
    if not all(parts):
        raise _Bad(f"expected comma-separated numbers such as 0.1 or 0.1,0.05, got {s!r}")
    return [check(p) for p in parts]


def positive_floats(s: str) -> list[float]:
    """One finite number > 0, or several separated by commas (one per block)."""
    return _floats(s, positive_float)


def nonneg_floats(s: str) -> list[float]:
    """One finite number >= 0, or several separated by commas."""
    return _floats(s, nonneg_float)


def int_list(s: str) -> list[int]:
    """Comma-separated integers >= 0 (``""`` is the empty list)."""
    if not s.strip():
        return []
    return [nonneg_int(p) for p in s.split(",")]


def slowdown(s: str) -> list[tuple[int, float]]:
    """``BLOCK:S`` or several, comma-separated: blocks 1-based, factors finite > 0."""
    out: list[tuple[int, float]] = []
    for part in [p.strip() for p in s.split(",")]:
        try:
            j, f = part.split(":")
            block, factor = int(j), float(f)
        except ValueError:
            raise _Bad(f"expected BLOCK:S such as 2:1.5 (blocks start at 1), got {part!r}") from None
        if block < 1:
            raise _Bad(f"blocks are numbered from 1, got {block} in {part!r}")
        if not (math.isfinite(factor) and 0 < factor <= MAX_SLOWDOWN):
            raise _Bad(f"the factor S must be a number > 0 and at most {MAX_SLOWDOWN:g} (S > 1 "
                       f"slows the block down), got {f!r} in {part!r}")
        out.append((block, factor))
    return out


def timeout(s: str) -> float:
    """Seconds to wait for a peer: a number from :data:`MIN_TIMEOUT` to
    :data:`MAX_TIMEOUT` (a wait near zero ends in a C++ error of torch's
    store, a huge one overflows its ``timedelta``)."""
    v = _float(s, strict=True)
    if not MIN_TIMEOUT <= v <= MAX_TIMEOUT:
        raise _Bad(f"must be a number of seconds from {MIN_TIMEOUT:g} to {MAX_TIMEOUT:g}, "
                   f"got {s!r}")
    return v


def slowdowns(items: list[list[tuple[int, float]]] | None) -> dict[int, float]:
    """Merge repeated ``--slowdown`` values into ``{block: factor}`` (a block at most once)."""
    out: dict[int, float] = {}
    for item in items or []:
        for block, factor in item:
            if block in out:
                raise ValueError(f"--slowdown gives block {block} twice; give each block once")
            out[block] = factor
    return out


def cpus(s: str) -> list[int]:
    """CPU ids such as ``0,1`` or ``0-3``."""
    out: list[int] = []
    try:
        for part in s.split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi or lo)
            if a < 0 or b < a:
                raise ValueError
            out += list(range(a, b + 1))
    except ValueError:
        raise _Bad(f"expected CPU ids >= 0 such as 0,1 or 0-3, got {s!r}") from None
    return sorted(set(out))


def host(s: str) -> str:
    """A host name or address to bind: not empty, no spaces."""
    v = s.strip()
    if not v or any(c.isspace() for c in v):
        raise _Bad(f"expected a host name or address such as 127.0.0.1, got {s!r}")
    return v


def nonempty(s: str) -> str:
    """A string that is not empty or blank."""
    if not s.strip():
        raise _Bad("must not be empty")
    return s


def _writable(s: str, folder: bool) -> str:
    try:
        check_writable(s, "path", folder=folder)
    except ValueError as e:
        raise _Bad(str(e).removeprefix("path ")) from None
    return s


def out_file(s: str) -> str:
    """A file this process can write (checked before any work starts)."""
    return _writable(s, folder=False)


def out_folder(s: str) -> str:
    """A folder this process can create or write in (checked before any work starts)."""
    return _writable(s, folder=True)


def one(v: Any) -> Any:
    """A one-element list as its element (``--lr 0.1`` is a number, ``--lr 0.1,0.2`` a list)."""
    return v[0] if isinstance(v, list) and len(v) == 1 else v
