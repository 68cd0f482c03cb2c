"""The bundle: the one artifact that crosses from host to device.

A bundle is a directory::

    BUNDLE/
      manifest.json          # Manifest below, format_version-checked
      heads.npz              # float classifier (W_i, b_i) of every exit head
      blocks/blocks_int8.tflite ...  # every block at one precision, one signature per block
      whole/whole_fp32.tflite ...  # the unsplit model, as a baseline
      edgetpu/block03_int8[_edgetpu].tflite ...  # optional: one full-int8 model per block for a Coral
      profiles/<device>.json # written on the device by `edgequee profile` (not hashed)
      policy/policy-<sha12>.json, policy/arrays-<sha12>.npz  # the stored gate (optional; see write_policy)

Every file named by the manifest carries its sha256 and is verified by ``load_bundle``. Bundles are written
into a temporary sibling directory and renamed into place, so a failed conversion never leaves half a bundle.

A bundle is untrusted input (``schema.py``): every path it names is relative and inside it, it holds no symlinks,
and every JSON file is validated before a number is read from it. The stored policy's certificate carries the
sha256 of the policy it certifies (``StoredPolicy.spec_sha256``); a policy edited after calibration loads as
uncertified. Writers take turns under ``locking.bundle_lock``; readers take no lock (see ``write_policy``).

Why int8 exit heads end in numpy: each block graph outputs the exit's logits *and* the head's features (e.g.
pooled activations). Float graphs' logits are used as they are; for int8 graphs the head's last Linear runs in
float on the device (microseconds) on the dequantized features. Quantizing that last layer to int8 rounds the
logits to ~1/256 of their range, which flips the top-1 of low-margin exits (measured on ResNet-56 with linear
heads: isolated int8 exit agreement 0.80 at the first exit with the Linear in int8).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from .errors import BundleError
from .locking import bundle_lock, dead_writer, remove_stale
from .schema import CALIBRATE_FIX, check_device_name, check_manifest, check_policy_spec

__all__ = [
    "FORMAT_VERSION",
    "PRECISIONS",
    "Precision",
    "QuantParams",
    "TensorSpec",
    "PrecisionArtifact",
    "BlockEntry",
    "InputSpec",
    "BlockParity",
    "ChainedParity",
    "ParityReport",
    "Manifest",
    "Bundle",
    "load_bundle",
    "write_bundle",
    "sha256_file",
    "write_json_atomic",
    "json_default",
    "staging_dir",
    "save_heads",
    "POLICY_DIR",
    "PolicyEntry",
    "Certificate",
    "StoredPolicy",
    "write_policy",
    "write_profile",
    "PolicyKept",
    "check_replaceable",
    "is_bundle_dir",
    "plain_files",
    "NotPlainFile",
]

FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
Precision = Literal["fp32", "fp16", "int8"]
MANIFEST = "manifest.json"
HEADS = "heads.npz"
POLICY_DIR = "policy"


@dataclass(frozen=True)
class QuantParams:
    """Affine per-tensor quantization: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name in the .tflite, NHWC shape, dtype and (for int8) quantization."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quant: QuantParams | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        q = d.get("quant")
        return cls(d["name"], tuple(d["shape"]), d["dtype"], QuantParams(**q) if q else None)


@dataclass(frozen=True)
class PrecisionArtifact:
    """A block (or the whole model) at one precision: a .tflite file and, in a multi-signature file, its signature.

    All blocks of one precision live in one file, one signature (subgraph) each: one interpreter then runs every
    block, so the blocks share XNNPACK's thread pool. With one interpreter per block, each block had to wake its
    own pool's worker threads, which made a 2-thread split run slower than the whole model.
    ``outputs`` maps a role to its tensor: ``hidden`` (the next block's input; absent in the last block),
    ``features`` (input of the exit head's float classifier) and ``logits`` for blocks; ``logits`` for the whole
    model.
    """

    precision: str
    file: str
    sha256: str
    size_bytes: int
    input: TensorSpec
    outputs: Mapping[str, TensorSpec]
    signature: str | None = None

    @property
    def float_head(self) -> bool:
        """True when exit logits must come from the float classifier on the (quantized) features, not the graph."""
        features = self.outputs.get("features")
        return features is not None and features.quant is not None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PrecisionArtifact":
        return cls(
            d["precision"],
            d["file"],
            d["sha256"],
            d["size_bytes"],
            TensorSpec.from_json(d["input"]),
            {k: TensorSpec.from_json(v) for k, v in d["outputs"].items()},
            d.get("signature"),
        )


@dataclass(frozen=True)
class BlockEntry:
    """Block ``index`` maps hidden state ``index`` (the image for block 0) to hidden ``index+1`` and exit ``index``."""

    index: int
    name: str
    macs: int
    params: int
    input_shape: tuple[int, ...]
    hidden_shape: tuple[int, ...] | None
    num_features: int
    artifacts: Mapping[str, PrecisionArtifact]
    edgetpu: PrecisionArtifact | None = None  # the block alone, full int8, for the Coral (convert --edgetpu)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "BlockEntry":
        return cls(
            d["index"],
            d["name"],
            d["macs"],
            d["params"],
            tuple(d["input_shape"]),
            tuple(d["hidden_shape"]) if d["hidden_shape"] is not None else None,
            d["num_features"],
            {k: PrecisionArtifact.from_json(v) for k, v in d["artifacts"].items()},
            PrecisionArtifact.from_json(d["edgetpu"]) if d.get("edgetpu") else None,
        )


@dataclass(frozen=True)
class InputSpec:
    """How raw uint8 RGB images (N, H, W, C) become the first block's float input: (x * scale - mean) / std."""

    height: int
    width: int
    channels: int = 3
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    color: str = "RGB"
    layout: str = "NHWC"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "InputSpec":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


@dataclass(frozen=True)
class BlockParity:
    """Isolated parity: the block fed the exact torch activations, compared with torch's outputs."""

    block: int
    precision: str
    exit_agreement: float
    hidden_max_abs_err: float | None
    features_max_abs_err: float


@dataclass(frozen=True)
class ChainedParity:
    """Chained parity: all blocks at one precision from the image; top-1 agreement and accuracy per exit."""

    precision: str
    exit_agreement: tuple[float, ...]
    exit_accuracy: tuple[float, ...] | None


@dataclass(frozen=True)
class ParityReport:
    n_images: int
    torch_exit_accuracy: tuple[float, ...] | None
    isolated: tuple[BlockParity, ...]
    chained: tuple[ChainedParity, ...]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ParityReport":
        acc = d.get("torch_exit_accuracy")
        return cls(
            d["n_images"],
            tuple(acc) if acc is not None else None,
            tuple(BlockParity(**b) for b in d["isolated"]),
            tuple(
                ChainedParity(
                    c["precision"],
                    tuple(c["exit_agreement"]),
                    tuple(c["exit_accuracy"]) if c.get("exit_accuracy") is not None else None,
                )
                for c in d["chained"]
            ),
        )

    def min_isolated_agreement(self, precision: str) -> float:
        return min(p.exit_agreement for p in self.isolated if p.precision == precision)

    def chained_for(self, precision: str) -> ChainedParity:
        for c in self.chained:
            if c.precision == precision:
                return c
        raise BundleError(f"no chained parity for {precision} in this bundle")


@dataclass(frozen=True)
class PolicyEntry:
    """Where the stored gate lives: its spec JSON and optional learned arrays (.npz), content-addressed, hashed."""

    file: str
    sha256: str
    arrays_file: str | None = None
    arrays_sha256: str | None = None

    def files(self) -> dict[str, str]:
        """Bundle-relative path → sha256 of every file of the stored policy."""
        out = {self.file: self.sha256}
        if self.arrays_file is not None and self.arrays_sha256 is not None:
            out[self.arrays_file] = self.arrays_sha256
        return out


@dataclass(frozen=True)
class Certificate:
    """What risk control proved about a stored policy on its calibration data (written by edgequee calibrate)."""

    risk: str  # gap | consistency
    on: str  # predictions | distributions
    epsilon: float
    delta: float | None  # None where the guarantee is in expectation (crc) or absent (naive)
    method: str  # naive | crc | ucb-hb | ucb-wsr | ltt
    guarantee: str
    n_cal: int
    knob: str
    knob_value: Any  # the chosen value, as stored in the policy's params
    empirical_risk: float
    bound: float | None  # the tested statistic at the chosen knob (adjusted risk, UCB or p-value)
    expected_saving: float  # 1 − mean cost ÷ the full model's, on the calibration data
    cost: str  # what the saving is measured in
    feasible: bool  # False: no knob passed and the safest setting was kept
    data_fingerprint: str
    created: str
    edgequee_version: str
    reference: str = "the policy at its safe knob"  # what the risk is measured against
    compared: Mapping[str, Any] | None = None  # calibrate --policy auto: the candidates and how the winner was chosen
    policy_sha256: str | None = None  # StoredPolicy.spec_sha256 of the policy certified: what binds the two


@dataclass(frozen=True)
class StoredPolicy:
    """A gate as stored in a bundle: registered policy name, constructor params, learned arrays, calibration."""

    name: str
    params: Mapping[str, Any]
    knob: str | None = None  # the scalar parameter risk control tunes, if any
    calibration: Mapping[str, Any] | None = None  # data_fingerprint, n_cal, device, objective, ...
    certificate: Certificate | None = None
    arrays: Mapping[str, np.ndarray] | None = field(default=None, compare=False)  # stored beside, not in the JSON
    certificate_problem: str | None = field(default=None, compare=False)  # why a stored certificate was dropped

    def spec_sha256(self) -> str:
        """sha256 of what a certificate vouches for: name, params, knob and the learned arrays (not the
        calibration notes). Params are hashed as their canonical JSON, arrays as dtype, shape and bytes."""
        h = hashlib.sha256(json.dumps({"name": self.name, "params": dict(self.params), "knob": self.knob},
                                      sort_keys=True, default=json_default).encode())
        for k in sorted(self.arrays or {}):
            a = np.ascontiguousarray(self.arrays[k])  # type: ignore[index]
            h.update(f"\0{k}\0{a.dtype.str}\0{a.shape}\0".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def certified(self) -> "StoredPolicy":
        """This policy with its certificate bound to it (``Certificate.policy_sha256``)."""
        if self.certificate is None:
            return self
        return dataclasses.replace(self, certificate=dataclasses.replace(self.certificate,
                                                                          policy_sha256=self.spec_sha256()))

    def checked(self) -> "StoredPolicy":
        """This policy as loaded: a certificate that does not vouch for exactly these params and arrays is
        dropped, and ``certificate_problem`` says why."""
        c = self.certificate
        if c is None:
            return self
        if c.policy_sha256 is None:
            problem = "its certificate names no policy hash (made by an older edgequee)"
        elif c.policy_sha256 != self.spec_sha256():
            problem = ("its params or arrays differ from what the certificate was computed for "
                       "(edited after calibration?)")
        else:
            return self
        return dataclasses.replace(self, certificate=None,
                                   certificate_problem=f"{problem}; it runs uncertified: re-run edgequee calibrate")

    def to_json(self) -> dict[str, Any]:
        """The spec file's content (arrays excluded)."""
        return {
            "name": self.name,
            "params": dict(self.params),
            "knob": self.knob,
            "calibration": dict(self.calibration) if self.calibration is not None else None,
            "certificate": dataclasses.asdict(self.certificate) if self.certificate is not None else None,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> "StoredPolicy":
        cert = d.get("certificate")
        return cls(d["name"], dict(d["params"]), d.get("knob"), d.get("calibration"),
                   Certificate(**cert) if cert else None, arrays)


@dataclass(frozen=True)
class Manifest:
    """Everything the device needs to know about a bundle (manifest.json)."""

    model: str
    classes: tuple[str, ...]
    input: InputSpec
    blocks: tuple[BlockEntry, ...]
    heads_sha256: str
    whole_model: Mapping[str, PrecisionArtifact]
    parity: ParityReport | None = None
    conversion: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    policy: PolicyEntry | None = None  # the stored gate (absent until edgequee calibrate writes one)

    @property
    def precisions(self) -> tuple[str, ...]:
        """Precisions available for every block, in PRECISIONS order."""
        common = set.intersection(*(set(b.artifacts) for b in self.blocks))
        return tuple(p for p in PRECISIONS if p in common)

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def cumulative_macs(self) -> list[int]:
        out, total = [], 0
        for b in self.blocks:
            total += b.macs
            out.append(total)
        return out

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Manifest":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format_version {version!r}, this edgequee reads {FORMAT_VERSION}; "
                "re-convert the model or install the matching edgequee"
            )
        check_manifest(d)
        try:
            return cls(
                model=d["model"],
                classes=tuple(d["classes"]),
                input=InputSpec.from_json(d["input"]),
                blocks=tuple(BlockEntry.from_json(b) for b in d["blocks"]),
                heads_sha256=d["heads_sha256"],
                whole_model={k: PrecisionArtifact.from_json(v) for k, v in d["whole_model"].items()},
                parity=ParityReport.from_json(d["parity"]) if d.get("parity") else None,
                conversion=d.get("conversion", {}),
                format_version=version,
                policy=PolicyEntry(**d["policy"]) if d.get("policy") else None,
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest.json is malformed ({type(e).__name__}: {e}); re-convert the model") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file next to ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a bundle must be readable by the device's service user
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_default(o: Any) -> Any:
    """``default=`` for json.dump: numpy scalars and arrays as plain JSON."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class Bundle:
    """A verified bundle on disk: its manifest, file paths, float exit heads and profiles.

    ``manifest_sha256`` is the sha256 of manifest.json as read (the flash agent names a deployed bundle by it).
    """

    def __init__(self, path: Path, manifest: Manifest, manifest_sha256: str | None = None,
                 policy_bytes: Mapping[str, bytes] | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self._policy_bytes = dict(policy_bytes or {})  # the stored policy's files as verified by load_bundle
        self._heads: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.verified = False  # load_bundle(verify=True) checked every file's sha256

    def file(self, artifact: PrecisionArtifact) -> Path:
        return self.path / artifact.file

    def block_artifact(self, block: int, precision: str) -> PrecisionArtifact:
        entry = self.manifest.blocks[block]
        try:
            return entry.artifacts[precision]
        except KeyError:
            raise BundleError(
                f"block {block} has no {precision} graph (has {', '.join(entry.artifacts)}); "
                f"re-convert with --precisions including {precision}"
            ) from None

    def heads(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Float (W, b) of each exit's classifier: logits = features @ W.T + b (shapes and finiteness checked)."""
        if self._heads is None:
            m, fix = self.manifest, "re-convert the model or re-flash the bundle"
            try:
                with np.load(self.path / HEADS, allow_pickle=False) as z:
                    heads = [(np.ascontiguousarray(z[f"w{i}"], np.float32),
                              np.ascontiguousarray(z[f"b{i}"], np.float32)) for i in range(m.num_exits)]
            except (OSError, ValueError, KeyError) as e:
                raise BundleError(f"{self.path}: {HEADS} is unreadable ({e}); {fix}") from e
            for i, (w, b) in enumerate(heads):
                want = (len(m.classes), m.blocks[i].num_features)
                if w.shape != want or b.shape != want[:1]:
                    raise BundleError(f"{self.path}: {HEADS} head {i} is {w.shape}+{b.shape}, the manifest needs "
                                      f"{want}+{want[:1]} ({len(m.classes)} classes); {fix}")
                if not (np.isfinite(w).all() and np.isfinite(b).all()):
                    raise BundleError(f"{self.path}: {HEADS} head {i} holds NaN or inf weights; {fix}")
            self._heads = heads
        return self._heads

    @property
    def profiles_dir(self) -> Path:
        return self.path / "profiles"

    def policy(self) -> StoredPolicy | None:
        """The stored gate (spec, certificate, learned arrays), or None when the bundle has none. A certificate
        that does not vouch for these exact params and arrays is dropped (``StoredPolicy.checked``)."""
        entry = self.manifest.policy
        if entry is None:
            return None
        fix = CALIBRATE_FIX
        try:
            raw = self._read(entry.file)
            spec = json.loads(raw)
            check_policy_spec(spec, f"{self.path}/{entry.file}")
            arrays = None
            if entry.arrays_file is not None:
                with np.load(io.BytesIO(self._read(entry.arrays_file)), allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                for k, a in arrays.items():
                    if a.dtype.kind not in "biuf" or (a.dtype.kind == "f" and not np.isfinite(a).all()):
                        raise BundleError(f"{self.path}: stored policy array {k!r} is {a.dtype} or holds NaN/inf; "
                                          f"{fix}")
            return StoredPolicy.from_json(spec, arrays).checked()
        except FileNotFoundError as e:
            raise BundleError(f"{self.path}: stored policy file {e.filename} is missing; {fix}") from e
        except (ValueError, KeyError, TypeError, OSError) as e:  # JSONDecodeError is a ValueError
            raise BundleError(f"{self.path}: stored policy {entry.file} is unreadable ({e}); {fix}") from e

    def _read(self, rel: str) -> bytes:
        """A bundle file's bytes: as verified at load time when it was, else read now (never through a symlink)."""
        if rel in self._policy_bytes:
            return self._policy_bytes[rel]
        return _read_plain(self.path, rel)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, model={self.manifest.model!r}, blocks={self.manifest.num_exits})"


def _artifacts(manifest: Manifest) -> list[PrecisionArtifact]:
    arts = [a for b in manifest.blocks for a in b.artifacts.values()]
    arts += [b.edgetpu for b in manifest.blocks if b.edgetpu is not None]
    return arts + list(manifest.whole_model.values())


def _read_plain(root: Path, rel: str) -> bytes:
    """``root/rel`` read without following a symlink at its last component (the walk refuses the others)."""
    fd = os.open(root / rel, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read()


class NotPlainFile(BundleError):
    """Something inside a bundle that is not a plain file or folder: a symlink (``link`` is its target) or a fifo,
    socket or device (``link`` None)."""

    def __init__(self, root: Path, rel: str, link: str | None):
        self.root, self.rel, self.link = root, rel, link
        super().__init__(f"{root}: {rel} is a symlink; a bundle holds plain files only: replace the link with the file "
                         "it should be, or re-convert the model" if link is not None else
                         f"{root}: {rel} is not a regular file; remove it or re-convert the model")


def plain_files(root: Path) -> dict[str, int]:
    """``{bundle-relative path: size}`` of every file inside ``root``, following nothing: ``NotPlainFile`` for the
    first symlink (or fifo, socket, device) found.

    ``root`` itself may be a symlink (a flashed device's ``current``); nothing inside it may be, so nothing a
    bundle names can lead outside it."""
    root = Path(root)
    files: dict[str, int] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise BundleError(f"{folder}: cannot list ({e.strerror}); fix its permissions") from e
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed meanwhile (a superseded policy file): not in the bundle any more
                continue
            rel = Path(entry.path).relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise NotPlainFile(root, rel, os.readlink(entry.path))
            if stat.S_ISDIR(st.st_mode):
                stack.append(Path(entry.path))
            elif stat.S_ISREG(st.st_mode):
                files[rel] = st.st_size
            else:
                raise NotPlainFile(root, rel, None)
    return files


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Read and verify a bundle: no symlinks, a valid manifest, and the sha256 of every file it names.

    A calibration running meanwhile replaces manifest.json and keeps the superseded policy files one
    generation, so a reader sees the old policy or the new one; should a file still vanish under it (two writes
    in a row), the read is retried against the new manifest."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        previous = _set_aside(path)
        if previous is None:
            raise BundleError(f"{path}: no {MANIFEST}; is this an edgequee bundle? (make one with edgequee convert)")
        if dead_writer(previous.name, _set_aside_prefix(path)):  # replay the dead writer's rollback
            try:
                with bundle_lock(path, "restore", timeout_s=5):
                    _recover_replaced(Path(path).absolute())
            except (OSError, BundleError):
                warnings.warn(f"{path} was being replaced by a process that died; reading the previous bundle from "
                              f"{previous} (the next edgequee convert puts it back)", stacklevel=2)
        if not mpath.is_file():
            path = previous  # a replace is between its two renames right now
    for attempt in range(5):
        plain_files(path)
        raw = _read_plain(path, MANIFEST)
        try:
            return _load(path, raw, verify)
        except BundleError:
            if attempt == 4 or _read_plain(path, MANIFEST) == raw:
                raise  # not a concurrent write: the bundle is broken
    raise AssertionError("unreachable")


def _load(path: Path, raw: bytes, verify: bool) -> Bundle:
    mpath = path / MANIFEST
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e}); the bundle is corrupt, re-convert or re-flash it") from e
    if not isinstance(data, dict):
        raise BundleError(f"{mpath}: expected a JSON object, got {type(data).__name__}; re-convert or re-flash it")
    manifest = Manifest.from_json(data)
    policy_bytes: dict[str, bytes] = {}
    if verify:
        checks = dict([(a.file, a.sha256) for a in _artifacts(manifest)] + [(HEADS, manifest.heads_sha256)])
        policy_files = manifest.policy.files() if manifest.policy is not None else {}
        checks.update(policy_files)
        for rel, expected in checks.items():
            f = path / rel
            fix = ("re-run edgequee calibrate on the bundle or re-flash it" if rel.startswith(f"{POLICY_DIR}/")
                   else "re-convert the model or re-flash the bundle")
            if not f.is_file():
                raise BundleError(f"{path}: {rel} is missing; {fix}")
            if rel in policy_files:
                policy_bytes[rel] = _read_plain(path, rel)
                got = hashlib.sha256(policy_bytes[rel]).hexdigest()
            else:
                got = sha256_file(f)
            if got != expected:
                raise BundleError(
                    f"{path}: {rel} sha256 mismatch (manifest {expected[:8]}, file {got[:8]}); "
                    f"the file is corrupt: {fix}"
                )
    bundle = Bundle(path, manifest, hashlib.sha256(raw).hexdigest(), policy_bytes)
    bundle.verified = verify
    if verify:
        bundle.heads()
    return bundle


def is_bundle_dir(path: Path) -> bool:
    """True for a directory (not a symlink) holding a manifest.json file: something edgequee may replace."""
    path = Path(path)
    manifest = path / MANIFEST
    return path.is_dir() and not path.is_symlink() and manifest.is_file() and not manifest.is_symlink()


def write_bundle(staging: Path, manifest: Manifest, dest: Path, overwrite: bool = False) -> Bundle:
    """Write ``manifest`` into ``staging`` (which holds every file it names) and move it to ``dest``.

    ``staging`` must be on the same filesystem as ``dest`` (make it with ``staging_dir(dest)``). An existing
    ``dest`` is replaced only with ``overwrite``, only when it is an edgequee bundle (or an empty folder), and
    with no moment without a valid bundle at ``dest``: the two directories are swapped in one
    ``renameat2(RENAME_EXCHANGE)``; where the kernel or filesystem lacks it, the old bundle is renamed aside
    first and put back by the next writer should this process die in between.
    """
    staging, dest = Path(staging), Path(dest).absolute()
    write_json_atomic(staging / MANIFEST, manifest.to_json())
    bundle = load_bundle(staging)  # verify what we are about to publish
    with bundle_lock(dest, "convert"):
        _recover_replaced(dest)
        remove_stale(dest.parent, f".{dest.name}.tmp-")
        if os.path.lexists(dest):
            check_replaceable(dest, overwrite)
            if not _exchange(staging, dest):
                old = dest.with_name(f"{_set_aside_prefix(dest)}{os.getpid()}-0")
                os.replace(dest, old)
                try:
                    os.replace(staging, dest)
                except OSError:
                    os.replace(old, dest)  # put the previous bundle back
                    raise
                staging = old
            shutil.rmtree(staging, ignore_errors=True)  # the previous bundle, swapped out
        else:
            os.replace(staging, dest)
    bundle.path = dest
    return bundle


def check_replaceable(dest: Path, overwrite: bool) -> None:
    """A BundleError unless the existing ``dest`` may be replaced: an edgequee bundle (or an empty folder), and
    ``overwrite``. A symlink, a file or a folder of anything else is never deleted."""
    if dest.is_symlink() or not dest.is_dir():
        what = "a symlink" if dest.is_symlink() else "a file"
        raise BundleError(f"{dest} exists and is not a bundle directory ({what}); edgequee will not replace it: "
                          "move it away or choose another --out")
    if not is_bundle_dir(dest) and any(dest.iterdir()):
        raise BundleError(f"{dest} exists and is not an edgequee bundle (no {MANIFEST}); edgequee will not delete it: "
                          "move it away or choose another --out")
    if not overwrite:
        raise BundleError(f"{dest} exists; pass --force to replace it")


def _recover_replaced(dest: Path) -> None:
    """Put back a bundle that a writer killed between its two renames left at ``.NAME.old-PID-*``; remove the
    other ones of dead writers."""
    old = _set_aside(dest)
    if old is not None and dead_writer(old.name, _set_aside_prefix(dest)):
        os.replace(old, dest)
    remove_stale(dest.parent, _set_aside_prefix(dest))


def _set_aside_prefix(dest: Path) -> str:
    """Where a replace without renameat2 puts the old bundle: ``.NAME.old-<pid>-0`` beside it."""
    return f".{Path(dest).absolute().name}.old-"


def _set_aside(dest: Path) -> Path | None:
    """The bundle a replace without renameat2 moved aside (``.NAME.old-PID-*``) when ``dest`` is gone: the window
    between its two renames, or a writer that died in it."""
    dest = Path(dest).absolute()
    if os.path.lexists(dest) or not dest.parent.is_dir():
        return None
    olds = [p for p in dest.parent.glob(f"{_set_aside_prefix(dest)}*") if is_bundle_dir(p)]
    return max(olds, key=lambda p: p.stat().st_mtime) if olds else None


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def staging_dir(dest: Path) -> Path:
    """A fresh temporary directory beside ``dest`` (same filesystem, so the final rename is atomic), named with
    this process's pid so that a later writer can remove it should this process die."""
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes 0700
    return path


def save_heads(path: Path, heads: Sequence[tuple[np.ndarray, np.ndarray]]) -> str:
    """Save float exit classifiers to ``path`` (heads.npz); return its sha256."""
    arrays = {}
    for i, (w, b) in enumerate(heads):
        arrays[f"w{i}"] = np.asarray(w, np.float32)
        arrays[f"b{i}"] = np.asarray(b, np.float32)
    np.savez(path, **arrays)
    return sha256_file(path)


def _without_policy(m: Manifest) -> Manifest:
    """What calibrate must find unchanged on disk before it writes: the manifest but for its policy entry."""
    return dataclasses.replace(m, policy=None)


class PolicyKept(BundleError):
    """``write_policy`` kept the bundle's certified policy rather than store an uncertified one over it."""


_POLICY_FILE = re.compile(r"(policy-[0-9a-f]{12}\.json|arrays-[0-9a-f]{12}\.npz)")


def write_policy(bundle: Bundle, policy: StoredPolicy, *, replace_certified: bool = True) -> Bundle:
    """Store ``policy`` in ``bundle`` (replacing any previous one) and return the reloaded bundle.

    Crash-safe and safe for readers: the new files are written under content-addressed names first
    (policy/policy-<sha12>.json, policy/arrays-<sha12>.npz), then manifest.json is replaced atomically, and only
    then are files older than the superseded policy deleted (that one is kept, for a reader that read the old
    manifest a moment ago), with the leftovers of interrupted writes. Writers take turns under the bundle's lock.
    The bundle must still be the one ``bundle`` was loaded from (a ``convert --force`` meanwhile is an error).
    With ``replace_certified=False`` a feasible certified policy in the bundle is not replaced by one whose
    certificate is infeasible: ``PolicyKept`` is raised and nothing changes.
    """
    root = Path(bundle.path)
    pdir = root / POLICY_DIR
    with bundle_lock(root, "calibrate"):
        plain_files(root)
        data = json.loads(_read_plain(root, MANIFEST))
        on_disk = Manifest.from_json(data) if isinstance(data, dict) else None
        if on_disk is None or _without_policy(on_disk) != _without_policy(bundle.manifest):
            raise BundleError(f"{root} was replaced while this ran (edgequee convert --force?); run it again on "
                              "the new bundle")
        if not replace_certified and policy.certificate is not None and not policy.certificate.feasible:
            current = load_bundle(root).policy()
            if current is not None and current.certificate is not None and current.certificate.feasible:
                raise PolicyKept(f"kept the certified policy already in {root} ({current.name}, "
                                 f"{current.certificate.knob}={current.certificate.knob_value})")
        previous = on_disk.policy.files() if on_disk.policy is not None else {}
        pdir.mkdir(exist_ok=True)
        for tmp in list(pdir.glob(".policy.*")) + list(pdir.glob(".arrays.*")) + list(root.glob(f".{MANIFEST}.*")):
            tmp.unlink(missing_ok=True)  # debris of a writer killed mid-write (every writer holds this lock)
        entry_arrays: tuple[str | None, str | None] = (None, None)
        if policy.arrays:
            arrays = {k: np.asarray(v) for k, v in policy.arrays.items()}
            entry_arrays = _publish(pdir, "arrays", ".npz", lambda f: np.savez(f, **arrays))
        spec = (json.dumps(policy.to_json(), indent=1, sort_keys=True, default=json_default) + "\n").encode()
        file, sha = _publish(pdir, "policy", ".json", lambda f: f.write(spec))
        entry = PolicyEntry(file, sha, *entry_arrays)
        data["policy"] = dataclasses.asdict(entry)
        Manifest.from_json(data)  # never publish a manifest this edgequee cannot read back
        write_json_atomic(root / MANIFEST, data)
        keep = {Path(f).name for f in (*entry.files(), *previous)}
        for f in pdir.iterdir():
            if f.name not in keep and _POLICY_FILE.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                f.unlink()
        return load_bundle(root)


def write_profile(bundle: Bundle, device: str, profile: Mapping[str, Any]) -> Path:
    """Write ``profile`` to ``BUNDLE/profiles/<device>.json`` (atomically, under the bundle's lock)."""
    check_device_name(device)
    root = Path(bundle.path)
    with bundle_lock(root, "profile"):
        plain_files(root)
        folder = bundle.profiles_dir
        folder.mkdir(exist_ok=True)
        for tmp in folder.glob(".*.json.*"):
            tmp.unlink(missing_ok=True)  # debris of a writer killed mid-write (every writer holds this lock)
        path = folder / f"{device}.json"
        write_json_atomic(path, profile)
    return path


def _publish(folder: Path, stem: str, suffix: str, write: Any) -> tuple[str, str]:
    """Write a file through ``write(fileobj)`` under a temporary name, then rename it to <stem>-<sha12><suffix>."""
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        sha = sha256_file(Path(tmp))
        name = f"{stem}-{sha[:12]}{suffix}"
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return f"{POLICY_DIR}/{name}", sha
