"""Error types: user errors (what was found, what was expected, what to do) vs internal ones."""

__all__ = ["EdgequeeError", "BundleError", "ConversionError", "DataError", "DeviceError", "InternalError"]


class EdgequeeError(Exception):
    """An error caused by the user's input or environment; the message names the fix."""


class BundleError(EdgequeeError):
    """A bundle is missing, corrupt, of another format version, or lacks what is asked of it."""


class ConversionError(EdgequeeError):
    """A model could not be converted, or its conversion failed a parity check."""


class DataError(EdgequeeError):
    """A dataset or input has the wrong format, shape or dtype."""


class DeviceError(EdgequeeError):
    """A runtime, delegate or device is missing or unreachable."""


class InternalError(Exception):
    """A broken invariant inside edgequee: please report it as a bug."""
