"""EdgeRunner: run a bundle block by block, ask the policy after every exit, stop at the first EXIT.

Device side: imports only numpy and a TFLite runtime (through edgequee.backend).
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .backend import Graph, InterpreterPool, edgetpu_delegate
from .bundle import Bundle, Certificate, InputSpec, QuantParams, StoredPolicy, load_bundle
from .errors import BundleError, DataError, DeviceError
from .policies import EXIT, ExitState, Policy, ThresholdPolicy, never_exits_early, policy_from_bundle, softmax
from .preprocess import InputTable, check_images
from .quant import copy_boundary, dequantize, fold_dequantize_into_linear, same_params

__all__ = ["Result", "EdgeRunner", "WholeModelRunner"]


@dataclass(frozen=True)
class Result:
    """One classified input."""

    class_id: int
    probs: np.ndarray
    exit_index: int
    precision_path: tuple[str, ...]
    latency_ms: float
    prediction_set: tuple[int, ...] | None = None  # conformal set at the exit taken, when the policy has one


@dataclass
class _Stage:
    """Block ``i`` at one precision, with everything the hot loop needs precomputed.

    ``logits`` is the exit's float32 logits after ``invoke`` (and, for int8, ``head()``): for float graphs a view
    of the graph's logits output; for int8 graphs a buffer filled by the float classifier,
    ``logits = head_at @ [features, 1]`` (dequantization and bias folded in, features copied into a float32
    buffer: one float GEMV is 2x faster than numpy's mixed int8 x float32 one, and every numpy call between two
    invokes counts). ``transfer[q]`` moves the hidden state into block i+1 at precision q.
    """

    invoke: Callable[[], object]
    logits: np.ndarray
    head_at: np.ndarray | None  # None: the graph's logits are used as they are
    head_in: np.ndarray | None
    head_body: np.ndarray | None  # head_in[:-1]
    features: np.ndarray  # view of the features output, batch row 0
    hidden: np.ndarray | None  # view of the hidden output (None for the last block)
    hidden_qp: QuantParams | None
    input: np.ndarray
    input_qp: QuantParams | None
    transfer: dict[str, Callable[[], object]] = field(default_factory=dict)

    def head(self) -> None:
        """Float classifier for int8 graphs (a no-op for float graphs, whose logits come out of the graph)."""
        if self.head_at is not None:
            np.copyto(self.head_body, self.features)  # type: ignore[arg-type]
            np.dot(self.head_at, self.head_in, out=self.logits)  # type: ignore[arg-type]

    def link(self, nxt: "_Stage", precision: str) -> None:
        if precision in self.transfer or self.hidden is None:
            return
        if same_params(self.hidden_qp, nxt.input_qp):
            self.transfer[precision] = functools.partial(np.copyto, nxt.input, self.hidden)
        else:
            self.transfer[precision] = functools.partial(
                copy_boundary, self.hidden, self.hidden_qp, nxt.input, nxt.input_qp
            )


@dataclass(frozen=True)
class _Chain:
    """The loop of a policy that cannot exit, precomputed: fill the first block's input, (invoke, hand-over) of
    every block but the last, then the last block and its exit head."""

    fill: Callable[[np.ndarray], object]
    steps: tuple[tuple[Callable[[], object], Callable[[], object]], ...]
    last: _Stage
    path: tuple[str, ...]


def _check_one(image: np.ndarray, spec: InputSpec) -> None:
    check_images(image, spec)
    if image.ndim != 3:
        raise DataError(f"classify takes one image (H, W, C), got {image.shape}; loop over a batch")


def _check_batch(images: np.ndarray, spec: InputSpec) -> None:
    check_images(images, spec)
    if images.ndim != 4:
        raise DataError(f"expected a batch (N, H, W, C), got {images.shape}; use images[None] for one image")


def _as_bundle(bundle: Bundle | str | os.PathLike[str]) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


class EdgeRunner:
    """Runs a bundle's blocks in order under a policy (default: the bundle's stored policy, else every block at the
    bundle's first precision, no exit). Warns once when a policy that can exit early has no risk certificate.

    Interpreters, input lookup tables, folded heads and output buffers are built once; ``classify`` allocates
    only its result. A policy at its safe knob (``never_exits_early``: it runs every block at its start precision)
    gets a loop without gate: invoke, hand-over, invoke..., and the exit head of the last block only. Between two
    invokes every µs counts twice: at 2 threads XNNPACK's worker spins ~20-50 µs for the next job and then sleeps,
    and Python right after an invoke runs 2-3x slower than in a micro-benchmark (its caches were evicted).
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        policy: Policy | None = None,
        *,
        num_threads: int = 1,
        use_xnnpack: bool = True,
        edgetpu: bool | str = False,
    ):
        """``edgetpu`` (True, or a device such as "usb:0") runs int8 blocks on a Coral Edge TPU, using the
        bundle's per-block Edge TPU models (``edgequee convert --edgetpu``); when the Edge TPU runtime or device
        is missing it warns and runs them on the CPU (``self.edgetpu`` then says False)."""
        self.bundle = _as_bundle(bundle)
        self.manifest = self.bundle.manifest
        self._pool = InterpreterPool(num_threads, use_xnnpack)
        self._tpu_pool = self._open_edgetpu("" if edgetpu is True else edgetpu) if edgetpu else None
        self.edgetpu = self._tpu_pool is not None
        self._stages: dict[tuple[int, str], _Stage] = {}
        self._luts: dict[str, InputTable] = {}
        self._stored = self.bundle.policy()
        self._warned = False
        self.policy: Policy = policy or policy_from_bundle(self.bundle) or ThresholdPolicy(self.manifest.precisions[0])
        self.set_policy(self.policy)

    @property
    def stored_policy(self) -> StoredPolicy | None:
        """The bundle's stored policy as loaded (``certificate_problem`` says why its certificate was dropped)."""
        return self._stored

    @property
    def certificate(self) -> Certificate | None:
        """The bundle's risk certificate if the policy running is the stored, calibrated one; else None."""
        stored, params = self._stored, getattr(self.policy, "params", None)
        if stored is None or stored.name != self.policy.name or params is None or params() != dict(stored.params):
            return None
        return stored.certificate

    def set_policy(self, policy: Policy) -> None:
        """Switch policy; graphs for its precisions are loaded now, not on the first frame."""
        for p in policy.precisions:
            if p not in self.manifest.precisions:
                raise BundleError(
                    f"policy {policy.name} needs {p} but the bundle has {', '.join(self.manifest.precisions)}; "
                    f"re-convert with --precisions including {p}"
                )
            for i in range(self.manifest.num_exits):
                self._stage(i, p)
        for i in range(self.manifest.num_exits - 1):
            for p in policy.precisions:
                for q in policy.precisions:
                    self._stages[i, p].link(self._stages[i + 1, q], q)
        self.policy = policy
        self._prediction_set = getattr(policy, "prediction_set", None)  # policy.prediction_set(exit, probs)
        no_exit = never_exits_early(policy)
        self._chain: _Chain | None = None
        if no_exit:
            start = policy.start()
            stages = [self._stages[i, start] for i in range(self.manifest.num_exits)]
            self._chain = _Chain(functools.partial(self._luts[start].fill, stages[0].input[0]),
                                 tuple((a.invoke, a.transfer[start]) for a in stages[:-1]), stages[-1],
                                 (start,) * len(stages))
        if not self._warned and self.certificate is None and not no_exit:
            self._warned = True
            problem = self._stored.certificate_problem if self._stored is not None else None
            warnings.warn(f"{policy!r} has no risk certificate"
                          + (f" (the stored one is not valid: {problem})" if problem else "")
                          + ": its accuracy loss from early exits is not controlled; run edgequee calibrate on "
                          f"{self.bundle.path}", stacklevel=2)

    def _open_edgetpu(self, device: str) -> InterpreterPool | None:
        if any(b.edgetpu is None for b in self.manifest.blocks):
            raise BundleError(f"{self.bundle.path} has no Edge TPU models; convert with edgequee convert --edgetpu")
        if not self.manifest.conversion.get("edgetpu", {}).get("compiled", False):
            warnings.warn("the bundle's Edge TPU models were not compiled (no edgetpu_compiler at conversion): "
                          "they run on the CPU; convert again with --edgetpu where the compiler is installed",
                          stacklevel=3)
        try:
            delegate = edgetpu_delegate(device)
        except DeviceError as e:
            warnings.warn(f"{e}; running int8 blocks on the CPU instead", stacklevel=3)
            return None
        return InterpreterPool(1, use_xnnpack=False, delegates=[delegate])

    def _stage(self, block: int, precision: str) -> _Stage:
        key = (block, precision)
        stage = self._stages.get(key)
        if stage is None:
            if precision == "int8" and self._tpu_pool is not None:
                art = self.manifest.blocks[block].edgetpu
                assert art is not None  # checked in _open_edgetpu
                g = self._tpu_pool.graph(self.bundle.file(art), art)
            else:
                art = self.bundle.block_artifact(block, precision)
                g = self._pool.graph(self.bundle.file(art), art)
            hidden = art.outputs.get("hidden")
            features = g.outputs["features"][0]
            head_at = head_in = None
            logits = g.outputs["logits"][0]
            if art.float_head:
                w, b = self.bundle.heads()[block]
                a, c = fold_dequantize_into_linear(w, b, art.outputs["features"].quant)
                head_at = np.ascontiguousarray(np.concatenate([a.T, c[:, None]], axis=1))
                head_in = np.ones(features.shape[0] + 1, np.float32)
                logits = np.empty(len(self.manifest.classes), np.float32)
            stage = _Stage(
                invoke=g.invoke,
                logits=logits,
                head_at=head_at,
                head_in=head_in,
                head_body=head_in[:-1] if head_in is not None else None,
                features=features,
                hidden=g.outputs["hidden"] if hidden is not None else None,
                hidden_qp=hidden.quant if hidden is not None else None,
                input=g.input,
                input_qp=art.input.quant,
            )
            self._stages[key] = stage
            if block == 0:
                self._luts[precision] = InputTable(self.manifest.input, art.input.quant)
        return stage

    def boundary(self, block: int, src: str, dst: str) -> Callable[[], object]:
        """The hand-over of the hidden state from block ``block - 1`` at ``src`` into block ``block`` at ``dst``."""
        a, b = self._stage(block - 1, src), self._stage(block, dst)
        a.link(b, dst)
        return a.transfer[dst]

    def classify(self, image: np.ndarray) -> Result:
        """Classify one uint8 RGB image (H, W, C) under the current policy."""
        if image.shape != self._stages[0, self.policy.start()].input.shape[1:] or image.dtype != np.uint8:
            _check_one(image, self.manifest.input)
        t0 = time.perf_counter()
        if self._chain is not None:
            return self._classify_every_block(image, t0)
        policy = self.policy
        last = self.manifest.num_exits - 1
        precision = policy.start()
        stage = self._stages[0, precision]
        self._luts[precision].fill(stage.input[0], image)
        path = [precision]
        state = ExitState(0, stage.logits, path)
        stages = self._stages
        i = 0
        while True:
            stage.invoke()
            if stage.head_at is not None:
                stage.head()
            if i == last:
                break
            state.exit_index = i
            state.logits = stage.logits
            decision = policy.decide(state)
            if decision == EXIT:
                break
            stage.transfer[decision]()
            i += 1
            stage = stages[i, decision]
            path.append(decision)
        probs = softmax(stage.logits)
        pset = self._prediction_set(i, probs) if self._prediction_set is not None else None
        latency_ms = (time.perf_counter() - t0) * 1e3
        return Result(int(probs.argmax()), probs, i, tuple(path), latency_ms, pset)

    def _classify_every_block(self, image: np.ndarray, t0: float) -> Result:
        """``classify`` for a policy that cannot exit: no gate, no intermediate exit heads."""
        chain = self._chain
        assert chain is not None
        chain.fill(image)
        for invoke, hand_over in chain.steps:
            invoke()
            hand_over()
        chain.last.invoke()
        chain.last.head()
        probs = softmax(chain.last.logits)
        last = len(chain.path) - 1
        pset = self._prediction_set(last, probs) if self._prediction_set is not None else None
        latency_ms = (time.perf_counter() - t0) * 1e3
        return Result(int(probs.argmax()), probs, last, chain.path, latency_ms, pset)

    def all_exits(self, images: np.ndarray, precisions: Sequence[str]) -> np.ndarray:
        """Logits of every exit for every image when block i runs at ``precisions[i]`` (no early exit).

        Returns float32 (N, num_exits, num_classes). Used for parity checks, traces and benchmarks.
        """
        _check_batch(images, self.manifest.input)
        if len(precisions) != self.manifest.num_exits:
            raise DataError(f"need one precision per block ({self.manifest.num_exits}), got {len(precisions)}")
        stages = [self._stage(i, p) for i, p in enumerate(precisions)]
        for i in range(len(stages) - 1):
            stages[i].link(stages[i + 1], precisions[i + 1])
        lut = self._luts[precisions[0]]
        out = np.empty((len(images), len(stages), len(self.manifest.classes)), np.float32)
        for n, image in enumerate(images):
            lut.fill(stages[0].input[0], image)
            for i, stage in enumerate(stages):
                stage.invoke()
                stage.head()
                out[n, i] = stage.logits
                if i + 1 < len(stages):
                    stage.transfer[precisions[i + 1]]()
        return out


class WholeModelRunner:
    """The unsplit model at one precision (the baseline edgequee is measured against)."""

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        precision: str = "fp32",
        *,
        num_threads: int = 1,
        use_xnnpack: bool = True,
    ):
        self.bundle = _as_bundle(bundle)
        try:
            art = self.bundle.manifest.whole_model[precision]
        except KeyError:
            have = ", ".join(self.bundle.manifest.whole_model) or "none"
            raise BundleError(f"no whole-model {precision} graph in this bundle (has {have})") from None
        self.precision = precision
        self.graph = Graph.open(self.bundle.file(art), art, num_threads, use_xnnpack)
        self._logits_view = self.graph.outputs["logits"][0]
        self._logits_qp = art.outputs["logits"].quant
        self._lut = InputTable(self.bundle.manifest.input, art.input.quant)
        self._logits = np.empty(len(self.bundle.manifest.classes), np.float32)

    def classify(self, image: np.ndarray) -> Result:
        if image.shape != self.graph.input.shape[1:] or image.dtype != np.uint8:
            _check_one(image, self.bundle.manifest.input)
        t0 = time.perf_counter()
        self._lut.fill(self.graph.input[0], image)
        self.graph.invoke()
        if self._logits_qp is None:
            np.copyto(self._logits, self._logits_view)
        else:
            dequantize(self._logits_view, self._logits_qp, out=self._logits)
        probs = softmax(self._logits)
        latency_ms = (time.perf_counter() - t0) * 1e3
        last = self.bundle.manifest.num_exits - 1
        return Result(int(probs.argmax()), probs, last, (self.precision,), latency_ms)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Float logits (N, num_classes) for a batch of uint8 images."""
        _check_batch(images, self.bundle.manifest.input)
        out = np.empty((len(images), len(self.bundle.manifest.classes)), np.float32)
        for n, image in enumerate(images):
            self._lut.fill(self.graph.input[0], image)
            self.graph.invoke()
            v = self._logits_view
            out[n] = v if self._logits_qp is None else dequantize(v, self._logits_qp)
        return out

