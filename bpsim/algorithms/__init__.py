"""Training methods, one module each, on the ``Trainer`` protocol of ``base``.

Which trainer class runs which method is written once, in the method
registry (:mod:`bpsim.methods`); ``get_trainer(name)`` reads it and imports
the trainer's module only when asked.
"""

from __future__ import annotations

from typing import Any

from bpsim import methods

__all__ = ["ALGORITHMS", "get_trainer"]

#: method name -> (module, trainer class), read from the registry
ALGORITHMS: dict[str, tuple[str, str]] = {
    m.name: tuple(m.trainer.split(":")) for m in methods.METHODS}  # type: ignore[misc]


def get_trainer(name: str) -> Any:
    """The trainer class of method ``name`` or an alias (``ValueError`` if unknown)."""
    return methods.load(methods.get(name).trainer)
