"""Loading Bastion's optional C extensions (built by ``make install`` where a C compiler is present)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def load_extension(name: str) -> ModuleType | None:
    """The compiled module ``name``, or None where it was not built or ``BASTION_PURE_PYTHON`` is set (to run,
    and compare against, the Python twins)."""
    if os.environ.get("BASTION_PURE_PYTHON"):
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
