"""The TFLite layer: pick a runtime, make interpreters, and run one graph through persistent zero-copy buffers."""

from __future__ import annotations

import functools
import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .bundle import PrecisionArtifact, TensorSpec
from .errors import BundleError, DeviceError

__all__ = ["runtime_name", "make_interpreter", "Graph", "InterpreterPool"]

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


def make_interpreter(path: Path, num_threads: int = 1, use_xnnpack: bool = True) -> Any:
    """An allocated interpreter for ``path``; XNNPACK (the default delegate) unless ``use_xnnpack`` is False."""
    mod, _ = _runtime()
    kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": int(num_threads)}
    if not use_xnnpack:
        kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interp = mod.Interpreter(**kwargs)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: the TFLite runtime cannot load this graph ({e}); re-convert the bundle") from e
    return interp


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

    def __init__(self, num_threads: int = 1, use_xnnpack: bool = True):
        self.num_threads = num_threads
        self.use_xnnpack = use_xnnpack
        self._interpreters: dict[Path, Any] = {}

    def graph(self, path: Path, artifact: PrecisionArtifact) -> Graph:
        interp = self._interpreters.get(path)
        if interp is None:
            interp = self._interpreters[path] = make_interpreter(path, self.num_threads, self.use_xnnpack)
        return Graph(interp, artifact, path)


def _check(path: Path, detail: dict[str, Any], spec: TensorSpec) -> None:
    shape = tuple(int(s) for s in detail["shape"])
    dtype = np.dtype(detail["dtype"]).name
    if shape != tuple(spec.shape) or dtype != spec.dtype:
        raise BundleError(
            f"{path}: tensor {spec.name!r} is {dtype}{list(shape)}, manifest says {spec.dtype}{list(spec.shape)}; "
            "the bundle is inconsistent, re-convert it"
        )
