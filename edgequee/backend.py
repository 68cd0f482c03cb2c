"""The TFLite layer: pick a runtime, make interpreters, and run one graph through persistent zero-copy buffers."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .bundle import PrecisionArtifact, TensorSpec
from .errors import BundleError, DeviceError

__all__ = ["runtime_name", "make_interpreter", "probe_edgetpu", "edgetpu_delegate", "Graph", "InterpreterPool"]

log = logging.getLogger(__name__)

# In order of preference; each entry: (import path, attribute holding Interpreter, pip name).
_RUNTIMES = (
    ("ai_edge_litert.interpreter", None, "ai-edge-litert"),
    ("tflite_runtime.interpreter", None, "tflite-runtime"),
    ("tensorflow", "lite", "tensorflow"),
)


@functools.lru_cache(maxsize=1)
def _runtime() -> tuple[ModuleType, str]:
    errors = []
    for module, attr, pip_name in _RUNTIMES:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            errors.append(f"{module}: {e}")
            continue
        return (getattr(mod, attr) if attr else mod), pip_name
    raise DeviceError(
        "no TFLite runtime found (tried ai_edge_litert, tflite_runtime, tensorflow.lite); "
        "run: pip install 'edgequee[device]'"
    )


def runtime_name() -> str:
    """Which TFLite runtime is in use, with its version, e.g. 'ai-edge-litert 2.3.0'."""
    mod, pip_name = _runtime()
    try:
        from importlib.metadata import version

        return f"{pip_name} {version(pip_name)}"
    except Exception:  # metadata is optional (e.g. a system package); the name alone still helps
        return pip_name


def make_interpreter(path: Path, num_threads: int = 1, use_xnnpack: bool = True, delegates: list[Any] | None = None) -> Any:
    """An allocated interpreter for ``path``; XNNPACK (the default delegate) unless ``use_xnnpack`` is False.

    ``delegates`` (e.g. ``[edgetpu_delegate()]``) are applied first; ops they do not take run on the CPU.
    """
    mod, _ = _runtime()
    kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": int(num_threads)}
    if not use_xnnpack:
        kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if delegates:
        kwargs["experimental_delegates"] = delegates
    try:
        interp = mod.Interpreter(**kwargs)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: the TFLite runtime cannot load this graph ({e}); re-convert the bundle") from e
    return interp


# ------------------------------------------------------------------------------------------ Edge TPU
# libedgetpu is built against one TFLite version; loaded into another runtime it can segfault the process
# (google-coral/edgetpu#812). So the delegate is first loaded in a throw-away subprocess, and only loaded here
# when that succeeded.
EDGETPU_LIBRARY = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}
_PROBE = """
import importlib, os, sys
module, attr, library, device = sys.argv[1:5]
mod = importlib.import_module(module)
mod = getattr(mod, attr) if attr else mod
load = getattr(mod, "load_delegate", None) or mod.experimental.load_delegate
try:
    load(library, {"device": device} if device else {})
except Exception as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
    os._exit(3)  # skip the half-made delegate's __del__ noise
"""


def _edgetpu_library() -> str:
    return EDGETPU_LIBRARY.get(platform.system(), "libedgetpu.so.1")


@functools.lru_cache(maxsize=None)
def probe_edgetpu(device: str = "") -> str | None:
    """None when the Edge TPU delegate loads (tried in a subprocess), else why it does not, as one line."""
    _runtime()
    module, attr, _ = next(r for r in _RUNTIMES if importlib.util.find_spec(r[0].split(".")[0]) is not None)
    lib = _edgetpu_library()
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, module, attr or "", lib, device],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not probe {lib} ({e})"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return (f"loading {lib} crashed the probe (signal {-proc.returncode}): a libedgetpu built for another TFLite "
                f"runtime version; install a matched libedgetpu/runtime pair (see device_profiles/coral-usb-rpi4.json)")
    first = (proc.stderr.strip().splitlines() or ["no error message"])[0 if proc.returncode == 3 else -1]
    return (f"{lib} did not load ({first[:200]}); install the Edge TPU runtime (libedgetpu1-std) and plug in the "
            f"Coral{f' at {device}' if device else ''}")


def edgetpu_delegate(device: str = "") -> Any:
    """The Edge TPU delegate (``device`` like "usb:0"; empty = the first one), after a successful probe."""
    why = probe_edgetpu(device)
    if why is not None:
        raise DeviceError(f"Edge TPU unavailable: {why}")
    mod, _ = _runtime()
    load = getattr(mod, "load_delegate", None) or mod.experimental.load_delegate
    return load(_edgetpu_library(), {"device": device} if device else {})


class Graph:
    """One graph (a block, or the whole model, at one precision), ready to run.

    ``input`` and ``outputs[role]`` are numpy views straight into the interpreter's tensor arena: write the
    input in place, call ``invoke()``, read the outputs in place. They stay valid because the graph's shapes
    are static and tensors are allocated once. The public ``Interpreter.invoke`` refuses to run while such
    views exist (it guards against ``allocate_tensors`` freeing them), so ``invoke`` calls the wrapped C++
    interpreter directly; fetching fresh views per call instead costs ~1 µs each, per block, per sample.

    Several Graphs may share one interpreter: a multi-signature file holds every block of one precision, one
    subgraph each (see ``PrecisionArtifact``).
    """

    def __init__(self, interpreter: Any, artifact: PrecisionArtifact, path: Path):
        self.artifact = artifact
        self.interpreter = interpreter
        wrapped = getattr(interpreter, "_interpreter", None)
        if not all(hasattr(wrapped, m) for m in ("Invoke", "tensor", "AllocateTensors")):
            raise DeviceError(
                f"this TFLite runtime ({runtime_name()}) lacks the interpreter wrapper edgequee uses for zero-copy "
                "invokes; install ai-edge-litert: pip install 'edgequee[device]'"
            )
        if artifact.signature is None:
            sub = 0
            ins = interpreter.get_input_details()
            outs = {d["name"]: d for d in interpreter.get_output_details()}
        else:
            try:
                sub = wrapped.GetSubgraphIndexFromSignature(artifact.signature)
            except ValueError:
                raise BundleError(f"{path}: no signature {artifact.signature!r}; re-convert the bundle") from None
            wrapped.AllocateTensors(sub)
            runner = interpreter.get_signature_runner(artifact.signature)
            ins = list(runner.get_input_details().values())
            outs = runner.get_output_details()
        if len(ins) != 1:
            raise BundleError(f"{path}: expected one input tensor, found {len(ins)}; re-convert the bundle")
        _check(path, ins[0], artifact.input)
        self.outputs: dict[str, np.ndarray] = {}
        for role, spec in artifact.outputs.items():
            if spec.name not in outs:
                raise BundleError(f"{path}: no output named {spec.name!r} ({role}); re-convert the bundle")
            _check(path, outs[spec.name], spec)
            self.outputs[role] = wrapped.tensor(interpreter, outs[spec.name]["index"], sub)
        self.input: np.ndarray = wrapped.tensor(interpreter, ins[0]["index"], sub)
        self.invoke = functools.partial(wrapped.Invoke, sub)

    @classmethod
    def open(cls, path: Path, artifact: PrecisionArtifact, num_threads: int = 1, use_xnnpack: bool = True) -> "Graph":
        """A Graph with an interpreter of its own (for one-off use: parity checks, conversion)."""
        return cls(make_interpreter(path, num_threads, use_xnnpack), artifact, path)


class InterpreterPool:
    """One interpreter per .tflite file, shared by every Graph in it."""

    def __init__(self, num_threads: int = 1, use_xnnpack: bool = True, delegates: list[Any] | None = None):
        self.num_threads = num_threads
        self.use_xnnpack = use_xnnpack
        self.delegates = delegates
        self._interpreters: dict[Path, Any] = {}

    def graph(self, path: Path, artifact: PrecisionArtifact) -> Graph:
        interp = self._interpreters.get(path)
        if interp is None:
            interp = make_interpreter(path, self.num_threads, self.use_xnnpack, self.delegates)
            self._interpreters[path] = interp
        return Graph(interp, artifact, path)


def _check(path: Path, detail: dict[str, Any], spec: TensorSpec) -> None:
    shape = tuple(int(s) for s in detail["shape"])
    dtype = np.dtype(detail["dtype"]).name
    if shape != tuple(spec.shape) or dtype != spec.dtype:
        raise BundleError(
            f"{path}: tensor {spec.name!r} is {dtype}{list(shape)}, manifest says {spec.dtype}{list(spec.shape)}; "
            "the bundle is inconsistent, re-convert it"
        )
