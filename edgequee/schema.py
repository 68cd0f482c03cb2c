"""Validation of the bundle's JSON files before anything reads a number from them.

A bundle is untrusted input: it may come from another machine, an old edgequee, a crafted download or a hand edit.
``check_manifest``, ``check_policy_spec`` and ``check_profile`` check types, shapes, finite numbers, paths and the
relations between fields (the head size is the number of classes, the blocks chain, the input spec is usable) and
fail with one line naming the field and the fix. They only validate: ``bundle.Manifest.from_json`` and friends build
the objects afterwards, so a file that passes here cannot end in a KeyError, a TypeError or a silent NaN.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any, Mapping, NoReturn

from .errors import BundleError, DeviceError

__all__ = ["check_manifest", "check_policy_spec", "check_profile", "check_device_name", "is_device_name",
           "CERTIFICATE_FIELDS"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DTYPES = {"float32", "float16", "int8", "uint8", "int16", "int32", "int64"}
CONVERT_FIX = "re-convert the model or re-flash the bundle"
CALIBRATE_FIX = "re-run edgequee calibrate on this bundle or re-flash it"
PROFILE_FIX = "re-run edgequee profile for this device"


class _Doc:
    """One JSON document being checked: fails with ``<where>: <field> <problem>; <fix>``."""

    def __init__(self, where: str, fix: str, error: type[Exception] = BundleError):
        self.where, self.fix, self.error = where, fix, error

    def fail(self, field: str, problem: str) -> NoReturn:
        raise self.error(f"{self.where}: {field} {problem}; {self.fix}")

    def obj(self, v: Any, field: str) -> Mapping[str, Any]:
        if not isinstance(v, dict):
            self.fail(field, f"must be a JSON object, got {_kind(v)}")
        return v

    def get(self, d: Mapping[str, Any], key: str, field: str) -> Any:
        if key not in d:
            self.fail(f"{field}.{key}" if field else key, "is missing")
        return d[key]

    def text(self, v: Any, field: str) -> str:
        if not isinstance(v, str) or not v:
            self.fail(field, f"must be a non-empty string, got {_kind(v)}")
        return v

    def integer(self, v: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(field, f"must be an integer, got {_kind(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self.fail(field, f"is {v}, must be in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
        return v

    def number(self, v: Any, field: str, lo: float | None = None, positive: bool = False,
               inf_ok: bool = False) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            self.fail(field, f"must be a number, got {_kind(v)}")
        if math.isnan(v) or (math.isinf(v) and not inf_ok):
            self.fail(field, f"is {v}, must be finite")
        if positive and not v > 0:
            self.fail(field, f"is {v}, must be > 0")
        if lo is not None and v < lo:
            self.fail(field, f"is {v}, must be >= {lo:g}")
        return float(v)

    def array(self, v: Any, field: str, nonempty: bool = False) -> list[Any]:
        if not isinstance(v, list):
            self.fail(field, f"must be a JSON list, got {_kind(v)}")
        if nonempty and not v:
            self.fail(field, "is empty")
        return v

    def shape(self, v: Any, field: str) -> tuple[int, ...]:
        return tuple(self.integer(d, f"{field}[{i}]", lo=1) for i, d in enumerate(self.array(v, field, nonempty=True)))

    def sha(self, v: Any, field: str) -> str:
        if not isinstance(v, str) or not _HEX64.fullmatch(v):
            self.fail(field, f"must be 64 lowercase hex digits (a sha256), got {_kind(v)}")
        return v

    def path(self, v: Any, field: str, under: str | None = None) -> str:
        if not isinstance(v, str):
            self.fail(field, f"must be a bundle-relative path, got {_kind(v)}")
        problem = _path_problem(v)
        if problem is None and under is not None and not v.startswith(f"{under}/"):
            problem = f"is outside {under}/"
        if problem is not None:
            self.fail(field, f"{v!r} {problem}")
        return v


def _kind(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _path_problem(rel: str) -> str | None:
    if not rel or "\\" in rel or "\0" in rel:
        return "is not a plain relative path"
    p = PurePosixPath(rel)
    if p.is_absolute():
        return "is absolute (bundle paths are relative to the bundle)"
    if any(part in ("..", ".", "") for part in rel.split("/")):
        return "leaves the bundle or is not normalised (no '..', '.' or '//')"
    return None


def is_device_name(name: str) -> bool:
    """True for a name usable as ``profiles/<name>.json``: letters, digits, '.', '_' and '-', no path."""
    return isinstance(name, str) and _DEVICE_NAME.fullmatch(name) is not None and ".." not in name


def check_device_name(name: str) -> str:
    """``name`` when ``is_device_name``, else a one-line DeviceError."""
    if not is_device_name(name):
        raise DeviceError(f"device name {name!r} is not a plain name; use letters, digits, '.', '_' or '-' "
                          "(e.g. rpi4, host, pi5-kitchen)")
    return name


# ------------------------------------------------------------------------------------------------ manifest


def check_manifest(d: Any, where: str = "manifest.json") -> None:
    """Everything ``Manifest.from_json`` and the runtime rely on (format_version is checked before this)."""
    doc = _Doc(where, CONVERT_FIX)
    doc.obj(d, "the manifest")
    doc.text(doc.get(d, "model", ""), "model")
    classes = doc.array(doc.get(d, "classes", ""), "classes", nonempty=True)
    for i, c in enumerate(classes):
        doc.text(c, f"classes[{i}]")
    if len(set(classes)) != len(classes):
        doc.fail("classes", "has duplicate names")
    height, width, channels = _check_input(doc, doc.obj(doc.get(d, "input", ""), "input"))
    blocks = doc.array(doc.get(d, "blocks", ""), "blocks", nonempty=True)
    expect_in: tuple[int, ...] = (1, height, width, channels)
    for i, b in enumerate(blocks):
        f = f"blocks[{i}]"
        doc.obj(b, f)
        if doc.integer(doc.get(b, "index", f), f"{f}.index") != i:
            doc.fail(f"{f}.index", f"is {b['index']}, must be {i} (blocks in order)")
        doc.text(doc.get(b, "name", f), f"{f}.name")
        doc.integer(doc.get(b, "macs", f), f"{f}.macs", lo=0)
        doc.integer(doc.get(b, "params", f), f"{f}.params", lo=0)
        shape = doc.shape(doc.get(b, "input_shape", f), f"{f}.input_shape")
        if shape != expect_in:
            doc.fail(f"{f}.input_shape", f"is {list(shape)}, must be {list(expect_in)} "
                                         + ("(the input spec's batch, height, width, channels)" if i == 0
                                            else f"(blocks[{i - 1}].hidden_shape)"))
        hidden = doc.get(b, "hidden_shape", f)
        last = i == len(blocks) - 1
        if last != (hidden is None):
            doc.fail(f"{f}.hidden_shape", "must be null for the last block only")
        if hidden is not None:
            expect_in = doc.shape(hidden, f"{f}.hidden_shape")
        features = doc.integer(doc.get(b, "num_features", f), f"{f}.num_features", lo=1)
        arts = doc.obj(doc.get(b, "artifacts", f), f"{f}.artifacts")
        if not arts:
            doc.fail(f"{f}.artifacts", "is empty")
        roles = ("features", "logits") + (() if last else ("hidden",))
        named: list[tuple[str, str | None, Any]] = [(f"{f}.artifacts.{p}", p, a) for p, a in arts.items()]
        if b.get("edgetpu") is not None:
            named.append((f"{f}.edgetpu", None, b["edgetpu"]))
        for field, p, a in named:
            _check_artifact(doc, a, field, p, len(classes), roles, features, shape, None if last else expect_in)
    doc.sha(doc.get(d, "heads_sha256", ""), "heads_sha256")
    for p, a in doc.obj(doc.get(d, "whole_model", ""), "whole_model").items():
        _check_artifact(doc, a, f"whole_model.{p}", p, len(classes), input_shape=(1, height, width, channels))
    if d.get("conversion") is not None:
        doc.obj(d["conversion"], "conversion")
    if d.get("parity") is not None:
        _check_parity(doc, doc.obj(d["parity"], "parity"), len(blocks))
    if d.get("policy") is not None:
        pol = doc.obj(d["policy"], "policy")
        unknown = set(pol) - {"file", "sha256", "arrays_file", "arrays_sha256"}
        if unknown:
            doc.fail("policy", f"has unknown fields {sorted(unknown)}")
        doc.path(doc.get(pol, "file", "policy"), "policy.file", under="policy")
        doc.sha(doc.get(pol, "sha256", "policy"), "policy.sha256")
        if (pol.get("arrays_file") is None) != (pol.get("arrays_sha256") is None):
            doc.fail("policy.arrays_file", "and policy.arrays_sha256 must be given together")
        if pol.get("arrays_file") is not None:
            doc.path(pol["arrays_file"], "policy.arrays_file", under="policy")
            doc.sha(pol["arrays_sha256"], "policy.arrays_sha256")


def _check_parity(doc: _Doc, p: Mapping[str, Any], num_blocks: int) -> None:
    """The conversion's parity report: one isolated entry per block and precision shown, one chained per precision."""
    doc.integer(doc.get(p, "n_images", "parity"), "parity.n_images", lo=0)

    def fractions(v: Any, f: str) -> None:
        if len(doc.array(v, f)) != num_blocks:
            doc.fail(f, f"has {len(v)} values for {num_blocks} blocks")
        for i, x in enumerate(v):
            doc.number(x, f"{f}[{i}]", lo=0)

    if p.get("torch_exit_accuracy") is not None:
        fractions(p["torch_exit_accuracy"], "parity.torch_exit_accuracy")
    chained = set()
    for i, c in enumerate(doc.array(doc.get(p, "chained", "parity"), "parity.chained")):
        f = f"parity.chained[{i}]"
        chained.add(doc.text(doc.get(doc.obj(c, f), "precision", f), f"{f}.precision"))
        fractions(doc.get(c, "exit_agreement", f), f"{f}.exit_agreement")
        if c.get("exit_accuracy") is not None:
            fractions(c["exit_accuracy"], f"{f}.exit_accuracy")
    seen = set()
    for i, b in enumerate(doc.array(doc.get(p, "isolated", "parity"), "parity.isolated")):
        f = f"parity.isolated[{i}]"
        doc.obj(b, f)
        known = {"block", "precision", "exit_agreement", "hidden_max_abs_err", "features_max_abs_err"}
        if set(b) != known:
            doc.fail(f, f"must have exactly the fields {sorted(known)}")
        seen.add((doc.integer(b["block"], f"{f}.block", lo=0, hi=num_blocks - 1),
                  doc.text(b["precision"], f"{f}.precision")))
        for key in ("exit_agreement", "features_max_abs_err", "hidden_max_abs_err"):
            if b[key] is not None or key != "hidden_max_abs_err":
                doc.number(b[key], f"{f}.{key}", lo=0)
    missing = [(i, q) for q in chained for i in range(num_blocks) if (i, q) not in seen]
    if missing:
        doc.fail("parity.isolated", f"lacks block {missing[0][0]} at {missing[0][1]}, which parity.chained reports")


def _check_input(doc: _Doc, spec: Mapping[str, Any]) -> tuple[int, int, int]:
    known = {"height", "width", "channels", "scale", "mean", "std", "color", "layout"}
    if set(spec) - known:
        doc.fail("input", f"has unknown fields {sorted(set(spec) - known)}")
    h = doc.integer(doc.get(spec, "height", "input"), "input.height", lo=1, hi=8192)
    w = doc.integer(doc.get(spec, "width", "input"), "input.width", lo=1, hi=8192)
    c = doc.integer(spec.get("channels", 3), "input.channels", lo=1, hi=4)
    doc.number(spec.get("scale", 1 / 255), "input.scale", positive=True)
    for key in ("mean", "std"):
        values = doc.array(doc.get(spec, key, "input"), f"input.{key}")
        if len(values) != c:
            doc.fail(f"input.{key}", f"has {len(values)} values for {c} channel(s)")
        for i, v in enumerate(values):
            doc.number(v, f"input.{key}[{i}]", positive=key == "std")
    if spec.get("layout", "NHWC") != "NHWC":
        doc.fail("input.layout", f"is {spec.get('layout')!r}; this edgequee runs NHWC bundles")
    doc.text(spec.get("color", "RGB"), "input.color")
    return h, w, c


def _check_artifact(doc: _Doc, a: Any, f: str, precision: str | None, num_classes: int,
                    roles: tuple[str, ...] = ("logits",), num_features: int | None = None,
                    input_shape: tuple[int, ...] | None = None, hidden_shape: tuple[int, ...] | None = None) -> None:
    doc.obj(a, f)
    got = doc.text(doc.get(a, "precision", f), f"{f}.precision")
    if precision is not None and got != precision:
        doc.fail(f"{f}.precision", f"is {got!r} under the key {precision!r}")
    doc.path(doc.get(a, "file", f), f"{f}.file")
    doc.sha(doc.get(a, "sha256", f), f"{f}.sha256")
    doc.integer(doc.get(a, "size_bytes", f), f"{f}.size_bytes", lo=0)
    if a.get("signature") is not None:
        doc.text(a["signature"], f"{f}.signature")
    _check_tensor(doc, doc.get(a, "input", f), f"{f}.input")
    outputs = doc.obj(doc.get(a, "outputs", f), f"{f}.outputs")
    for role, t in outputs.items():
        _check_tensor(doc, t, f"{f}.outputs.{role}")
    for role in roles:
        if role not in outputs:
            doc.fail(f"{f}.outputs", f"has no {role} (the runtime reads {', '.join(roles)})")
    want = {"logits": num_classes, "features": num_features}
    for role, n in want.items():
        if role in outputs and n is not None and outputs[role]["shape"][-1] != n:
            doc.fail(f"{f}.outputs.{role}.shape", f"ends in {outputs[role]['shape'][-1]}, the manifest says {n}"
                                                  + (" classes" if role == "logits" else " features"))
    if input_shape is not None and tuple(a["input"]["shape"]) != input_shape:
        doc.fail(f"{f}.input.shape", f"is {a['input']['shape']}, the block's input_shape is {list(input_shape)}")
    if hidden_shape is not None and tuple(outputs["hidden"]["shape"]) != hidden_shape:
        doc.fail(f"{f}.outputs.hidden.shape", f"is {outputs['hidden']['shape']}, the block's hidden_shape is "
                                              f"{list(hidden_shape)}")


def _check_tensor(doc: _Doc, t: Any, f: str) -> None:
    doc.obj(t, f)
    doc.text(doc.get(t, "name", f), f"{f}.name")
    doc.shape(doc.get(t, "shape", f), f"{f}.shape")
    if doc.get(t, "dtype", f) not in _DTYPES:
        doc.fail(f"{f}.dtype", f"is {t['dtype']!r}, expected one of {sorted(_DTYPES)}")
    q = t.get("quant")
    if q is not None:
        doc.obj(q, f"{f}.quant")
        doc.number(doc.get(q, "scale", f"{f}.quant"), f"{f}.quant.scale", positive=True)
        doc.integer(doc.get(q, "zero_point", f"{f}.quant"), f"{f}.quant.zero_point", lo=-32768, hi=65535)


# ------------------------------------------------------------------------------------------------- policy

CERTIFICATE_FIELDS: dict[str, Any] = {
    "risk": str, "on": str, "epsilon": float, "delta": (float, type(None)), "method": str, "guarantee": str,
    "n_cal": int, "knob": str, "knob_value": object, "empirical_risk": float, "bound": (float, type(None)),
    "expected_saving": float, "cost": str, "feasible": bool, "data_fingerprint": str, "created": str,
    "edgequee_version": str, "reference": str, "compared": (dict, type(None)), "policy_sha256": (str, type(None)),
}
_OPTIONAL_CERTIFICATE = {"reference", "compared", "policy_sha256"}


def check_policy_spec(d: Any, where: str) -> None:
    """A stored policy's spec file: name, params (no NaN anywhere), knob, calibration and certificate."""
    doc = _Doc(where, CALIBRATE_FIX)
    doc.obj(d, "the policy spec")
    unknown = set(d) - {"name", "params", "knob", "calibration", "certificate"}
    if unknown:
        doc.fail("the policy spec", f"has unknown fields {sorted(unknown)}")
    doc.text(doc.get(d, "name", ""), "name")
    params = doc.obj(doc.get(d, "params", ""), "params")
    _no_nan(doc, params, "params")
    knob = d.get("knob")
    if knob is not None and (not isinstance(knob, str) or knob not in params):
        doc.fail("knob", f"{knob!r} is not one of the params ({', '.join(params) or 'none'})")
    if d.get("calibration") is not None:
        doc.obj(d["calibration"], "calibration")
    cert = d.get("certificate")
    if cert is None:
        return
    doc.obj(cert, "certificate")
    for key, kind in CERTIFICATE_FIELDS.items():
        if key not in cert:
            if key in _OPTIONAL_CERTIFICATE:
                continue
            doc.fail(f"certificate.{key}", "is missing")
        v = cert[key]
        if kind is float or (isinstance(kind, tuple) and float in kind and v is not None):
            doc.number(v, f"certificate.{key}", inf_ok=key == "bound")
        elif kind is int:
            doc.integer(v, f"certificate.{key}", lo=0)
        elif kind is not object and not isinstance(v, kind):
            doc.fail(f"certificate.{key}", f"must be {getattr(kind, '__name__', kind)}, got {_kind(v)}")
    if set(cert) - set(CERTIFICATE_FIELDS):
        doc.fail("certificate", f"has unknown fields {sorted(set(cert) - set(CERTIFICATE_FIELDS))}")
    if not 0 < cert["epsilon"] <= 1:
        doc.fail("certificate.epsilon", f"is {cert['epsilon']}, must be in (0, 1]")


def _no_nan(doc: _Doc, v: Any, field: str) -> None:
    if isinstance(v, float) and math.isnan(v):
        doc.fail(field, "is NaN")
    if isinstance(v, dict):
        for k, x in v.items():
            _no_nan(doc, x, f"{field}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _no_nan(doc, x, f"{field}[{i}]")


# ------------------------------------------------------------------------------------------------ profile


def check_profile(d: Any, where: str, num_blocks: int) -> None:
    """A measured profile (profiles/<device>.json): every latency and energy the cost model reads is a finite,
    non-negative number, for blocks that exist."""
    doc = _Doc(where, PROFILE_FIX, DeviceError)
    doc.obj(d, "the profile")
    for i, b in enumerate(doc.array(d.get("blocks", []), "blocks")):
        f = f"blocks[{i}]"
        doc.obj(b, f)
        doc.integer(doc.get(b, "block", f), f"{f}.block", lo=0, hi=num_blocks - 1)
        doc.text(doc.get(b, "precision", f), f"{f}.precision")
        _latency(doc, b, f)
    for p, w in doc.obj(d.get("whole_model", {}), "whole_model").items():
        _latency(doc, doc.obj(w, f"whole_model.{p}"), f"whole_model.{p}")
    for key in ("runtime_overhead_ms", "inference_overhead_ms"):
        for p, g in doc.obj(d.get(key, {}), key).items():
            doc.number(doc.get(doc.obj(g, f"{key}.{p}"), "value", f"{key}.{p}"), f"{key}.{p}.value", lo=0)
    for i, t in enumerate(doc.array(d.get("transitions", []), "transitions")):
        f = f"transitions[{i}]"
        doc.obj(t, f)
        doc.integer(doc.get(t, "boundary", f), f"{f}.boundary", lo=0, hi=num_blocks - 1)
        doc.text(doc.get(t, "from", f), f"{f}.from")
        doc.text(doc.get(t, "to", f), f"{f}.to")
        _latency(doc, t, f)


def _latency(doc: _Doc, entry: Mapping[str, Any], f: str) -> None:
    lat = doc.obj(doc.get(entry, "latency_ms", f), f"{f}.latency_ms")
    doc.number(doc.get(lat, "p50_ms", f"{f}.latency_ms"), f"{f}.latency_ms.p50_ms", positive=True)
    energy = entry.get("energy")
    if energy is not None and doc.obj(energy, f"{f}.energy").get("net_mj_per_inference") is not None:
        doc.number(energy["net_mj_per_inference"], f"{f}.energy.net_mj_per_inference", lo=0)
