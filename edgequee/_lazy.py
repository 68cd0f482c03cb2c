"""Lazy import of optional heavy dependencies with an error that names the extra to install."""

import importlib
from types import ModuleType


def require(module: str, extra: str = "host") -> ModuleType:
    """Import ``module`` or raise ImportError telling which edgequee extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is not installed (needed here: {e}); run: pip install 'edgequee[{extra}]'"
        ) from e
