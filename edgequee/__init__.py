"""edgequee: dynamic neural networks on edge devices. Device-side API only; nothing heavy is imported here."""

from .bundle import Manifest as Manifest
from .bundle import load_bundle as load_bundle
from .runtime import EdgeRunner as EdgeRunner

__version__ = "0.1.0"
__all__ = ["__version__", "load_bundle", "EdgeRunner", "Manifest"]
