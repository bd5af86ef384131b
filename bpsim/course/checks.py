"""Exercise checks that teach: correct, close (with a hint), or not attempted.

Each lesson's exercises call a function here, e.g. ``checks.idle_fraction(4, answer)``.
The answer is compared with a value computed by the library itself, and a
wrong answer that matches a *known mistake* gets a hint about that mistake
(the style of Kaggle's learntools and nn-zero-to-hero's ``cmp``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Feedback", "compare", "idle_fraction"]


@dataclass
class Feedback:
    """The verdict on an answer; shows itself nicely in a notebook."""

    status: str  # "correct", "close", "incorrect", "not attempted"
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.status == "correct"

    def __repr__(self) -> str:
        icon = {"correct": "✅", "close": "🟡", "incorrect": "❌", "not attempted": "⬜"}[self.status]
        return f"{icon} {self.status}: {self.message}"

    def _repr_markdown_(self) -> str:
        return repr(self)


def _as_array(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    if isinstance(v, (list, tuple)) and v and hasattr(v[0], "detach"):
        return np.concatenate([np.ravel(t.detach().cpu().numpy()) for t in v])
    return np.asarray(v, dtype=float)


def compare(
    answer: Any,
    expected: Any,
    *,
    rtol: float = 1e-4,
    close_rtol: float = 5e-2,
    mistakes: Sequence[tuple[Any, str]] = (),
    hint: str = "",
) -> Feedback:
    """Compare an answer (number, array, tensor or list of tensors) with the expected value.

    ``mistakes`` lists ``(wrong value, hint)`` pairs: an answer equal to a
    known wrong value gets that hint. Within ``close_rtol`` it is "close".
    """
    if answer is None or answer is Ellipsis:
        return Feedback("not attempted", "replace the ... / None with your answer and run the cell again")
    try:
        a, e = _as_array(answer), _as_array(expected)
    except (TypeError, ValueError):
        return Feedback("incorrect", f"expected a number or array, got {type(answer).__name__}")
    if a.shape != e.shape:
        return Feedback("incorrect", f"expected shape {e.shape}, got {a.shape}")
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-12)
    err = float(np.max(np.abs(a - e))) / scale if e.size else 0.0
    if not np.all(np.isfinite(a)):
        return Feedback("incorrect", "your answer contains NaN or inf", {"rel_error": float("inf")})
    if err <= rtol:
        return Feedback("correct", f"matches (relative error {err:.1e})", {"rel_error": err})
    for wrong, why in mistakes:
        w = _as_array(wrong)
        if w.shape == a.shape and float(np.max(np.abs(a - w))) / scale <= rtol:
            return Feedback("incorrect", why, {"rel_error": err})
    if err <= close_rtol:
        return Feedback("close", f"relative error {err:.1e}. {hint}".strip(), {"rel_error": err})
    return Feedback("incorrect", f"relative error {err:.1e}. {hint}".strip(), {"rel_error": err})


def idle_fraction(blocks: int, answer: Any) -> Feedback:
    """Lesson 00: the fraction of time each of K equally fast devices idles under
    fully locked model-parallel backprop (communication and update ignored).

    Every device works on its block's forward and backward, F + B, and waits
    while the other K - 1 blocks do theirs: it is busy 1/K of the time.
    """
    expected = 1 - 1 / blocks
    return compare(answer, expected, rtol=1e-3, mistakes=[
        (1 / blocks, "that is the fraction of time a device is *busy*; the question asks how long it idles"),
        (1 - 1 / (2 * blocks), "forward and backward both belong to the same device: count them together"),
    ], hint="with K blocks of equal cost, how many of the K time slots of a step does one device work in?")


def registry() -> dict[str, Callable[..., Feedback]]:
    """Every check by name (used by tests to make sure each has a lesson)."""
    import inspect
    import sys

    mod = sys.modules[__name__]
    return {n: f for n, f in inspect.getmembers(mod, inspect.isfunction)
            if f.__module__ == __name__ and n not in {"compare", "registry", "_as_array"}}
