"""The model registry: ``@register_model`` (the function name is the registry name), ``create_model``, ``list_models``.

The built-in families register themselves when their module is imported; ``create_model`` and ``list_models``
import them first, so callers never need to.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, TypeVar

from edgequee.errors import ConversionError

if TYPE_CHECKING:
    from .multiexit import MultiExitModel

__all__ = ["register_model", "create_model", "list_models", "is_model"]

# Modules (relative to this package) whose import registers the built-in families.
_FAMILY_MODULES = ("resnet_cifar", "mobilenetv2_cifar")

_MODELS: dict[str, Callable[..., object]] = {}

F = TypeVar("F", bound=Callable[..., object])


def register_model(fn: F) -> F:
    """Register a model factory under its function name; the factory returns a ``MultiExitModel``."""
    name = fn.__name__
    existing = _MODELS.get(name)
    # Same module re-imported (importlib.reload) is fine; two different factories with one name are not.
    if existing is not None and existing.__module__ != fn.__module__:
        qual = f"{getattr(existing, '__module__', '?')}.{name}"
        raise ConversionError(f"model {name!r} is already registered (by {qual}); pick another function name")
    _MODELS[name] = fn
    return fn


def _import_families() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(f"{__package__}.{module}")


def list_models() -> list[str]:
    """All registered model names, sorted."""
    _import_families()
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    _import_families()
    return name in _MODELS


def create_model(name: str, **kwargs: object) -> MultiExitModel:
    """Build the registered model ``name`` with the factory's keyword arguments."""
    _import_families()
    try:
        factory = _MODELS[name]
    except KeyError:
        raise ConversionError(f"unknown model {name!r}; valid models: {', '.join(sorted(_MODELS))}") from None
    return factory(**kwargs)  # type: ignore[return-value]
