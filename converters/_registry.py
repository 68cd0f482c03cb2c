"""The model registry: ``@register_model`` (the function name is the registry name), ``create_model``, ``list_models``.

The built-in families register themselves when their module is imported; ``create_model`` and ``list_models``
import them first, so callers never need to.

The factory contract (``FACTORY_CONTRACT``): a factory is called with keyword arguments only and returns a
``MultiExitModel`` whose ``config`` holds ``arch`` (the registry name) and whatever else rebuilds it. It must accept
``classes=`` and its own ``config`` entries (``load_checkpoint`` calls ``factory(**config, classes=...)``). The
options ``exits=``, ``head=`` and ``pretrained=`` of ``edgequee train/convert`` are passed only to a factory that
declares them (or takes ``**kwargs``). Any other parameter needs a default.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Callable, TypeVar

from edgequee.errors import ConversionError

if TYPE_CHECKING:
    from .multiexit import MultiExitModel

__all__ = ["register_model", "create_model", "list_models", "is_model", "factory_parameters", "check_arguments",
           "FACTORY_CONTRACT"]

FACTORY_CONTRACT = (
    "a @register_model factory takes keyword arguments only: classes= and its own config entries (to rebuild a "
    "checkpoint), exits=/head=/pretrained= if it supports those options; every other parameter needs a default"
)

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


def _factory(name: str) -> Callable[..., object]:
    _import_families()
    try:
        return _MODELS[name]
    except KeyError:
        raise ConversionError(f"unknown model {name!r}; valid models: {', '.join(sorted(_MODELS))}") from None


def _signature(factory: Callable[..., object]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return None


def factory_parameters(name: str) -> frozenset[str] | None:
    """The keyword arguments the factory of ``name`` accepts; None when it takes any (``**kwargs``)."""
    sig = _signature(_factory(name))
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(n for n, p in sig.parameters.items() if p.kind in kinds)


def check_arguments(name: str, kwargs: dict[str, object]) -> None:
    """Raise a one-line ConversionError (naming ``FACTORY_CONTRACT``) unless ``name``'s factory takes ``kwargs``."""
    factory = _factory(name)
    sig = _signature(factory)
    if sig is None:
        return
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        where = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', name)}"
        raise ConversionError(f"model {name!r}: {where}() {e}; {FACTORY_CONTRACT}") from None


def create_model(name: str, **kwargs: object) -> MultiExitModel:
    """Build the registered model ``name`` with the factory's keyword arguments (checked against its signature)."""
    factory = _factory(name)
    check_arguments(name, kwargs)
    return factory(**kwargs)  # type: ignore[return-value]
