"""Human-readable tables for the CLI (and an accuracy–latency plot); pure formatting, no measurement."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ._lazy import require
from .bundle import Bundle, StoredPolicy

if TYPE_CHECKING:
    from .cost import CostModel
    from .devices import DeviceDescriptor

__all__ = ["table", "inspect_text", "profile_table", "devices_table", "device_text", "cost_table", "bench_table",
           "quickstart_text", "certified_line", "plot_bench", "policy_text", "calibrate_text"]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned numeric columns."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).rjust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def inspect_text(bundle: Bundle) -> str:
    m = bundle.manifest
    lines = [
        f"bundle {bundle.path}  (format {m.format_version}, "
        f"{'verified' if bundle.verified else 'NOT verified: --no-verify'})",
        f"manifest.json sha256 {bundle.manifest_sha256}",
        f"model {m.model}: {m.num_exits} blocks, {len(m.classes)} classes, input {m.input.height}x{m.input.width}x"
        f"{m.input.channels} {m.input.color} ({m.input.layout})",
        f"precisions: {', '.join(m.precisions)}; whole model: {', '.join(m.whole_model) or 'none'}",
    ]
    rows = []
    cum = m.cumulative_macs()
    for b, c in zip(m.blocks, cum):
        sizes = " ".join(f"{p}:{a.size_bytes // 1024}K" for p, a in b.artifacts.items())
        rows.append([b.index, b.macs / 1e6, 100 * c / cum[-1], b.params, "x".join(map(str, b.hidden_shape or ())), sizes])
    lines += ["", table(["block", "MMACs", "cum %", "params", "hidden (NHWC)", "files"], rows)]
    if m.parity:
        p = m.parity
        precs = [c.precision for c in p.chained]
        rows = []
        for i in range(m.num_exits):
            row: list[Any] = [i, _pct(p.torch_exit_accuracy[i]) if p.torch_exit_accuracy else "-"]
            for prec in precs:
                iso = next(x for x in p.isolated if x.block == i and x.precision == prec)
                ch = p.chained_for(prec)
                row += [_pct(iso.exit_agreement), _pct(ch.exit_agreement[i]),
                        _pct(ch.exit_accuracy[i]) if ch.exit_accuracy else "-"]
            rows.append(row)
        heads = ["exit", "torch acc%"] + [f"{q} {k}" for q in precs for k in ("iso agr%", "chain agr%", "acc%")]
        lines += ["", f"parity on {p.n_images} images (agreement = top-1 equal to torch's):", table(heads, rows)]
    if m.conversion.get("seconds"):
        lines.append(f"\nconversion: {m.conversion['seconds'].get('total_s', 0):.1f} s")
    profiles = sorted(bundle.profiles_dir.glob("*.json")) if bundle.profiles_dir.is_dir() else []
    if profiles:
        lines.append("profiles: " + ", ".join(f.stem for f in profiles))
    stored = bundle.policy()
    if stored is not None:
        lines += ["", policy_text(stored)]
    return "\n".join(lines)


def policy_text(stored: StoredPolicy) -> str:
    """The stored gate and its risk certificate, in words."""
    params = ", ".join(f"{k}={v}" for k, v in stored.params.items())
    lines = [f"policy: {stored.name} ({params})" + (f"; arrays: {', '.join(stored.arrays)}" if stored.arrays else "")]
    c = stored.certificate
    if c is None:
        lines.append(f"certificate: NOT VALID: {stored.certificate_problem}" if stored.certificate_problem else
                     "certificate: none (uncalibrated: the accuracy lost to early exits is not controlled)")
        return "\n".join(lines)
    level = f", δ={c.delta:g}" if c.delta is not None else ""
    status = "" if c.feasible else "  [NO KNOB PASSED: the safest setting (no early exit) is kept]"
    bound = "-" if c.bound is None else f"{c.bound:.4g}"
    lines += [
        f"certificate: {c.risk} risk on {c.on} ≤ ε={c.epsilon:g}{level} by {c.method}: {c.guarantee}{status}",
        f"  {c.knob}={c.knob_value} from {c.n_cal} calibration images: empirical risk {c.empirical_risk:.4g}, "
        f"tested statistic {bound}, expected saving {100 * c.expected_saving:.1f} % ({c.cost})",
        f"  risk against the {c.reference}; data {c.data_fingerprint[:19]}…, {c.created}, edgequee {c.edgequee_version}",
    ]
    return "\n".join(lines)


def calibrate_text(report: dict[str, Any]) -> str:
    """What edgequee calibrate chose and wrote (``calibrate.calibrate_bundle``'s report)."""
    sel = report["selection"]
    lines = []
    auto = sel.get("auto")
    if auto:
        rows = [[c["candidate"], "/".join(c.get("precisions", [])) or "-", "skipped: " + c["skipped"][:70]
                 if "skipped" in c else ("yes" if c["feasible"] else "no"),
                 "-" if "skipped" in c else f"{c['knob']:.4g}", "-" if "skipped" in c else f"{c['expected_latency_ms']:.4g}"]
                for c in auto["candidates"]]
        lines.append(f"auto on {auto['device']}: {auto['n_select']} images choose among the candidates, "
                     f"{auto['n_certify']} others certify the winner")
        lines.append(table(["candidate", "precisions", "passes", "knob", "expected ms"], rows))
        lines.append(auto["message"])
    lines += [f"searched {sel['grid_size']} settings from the safe end; chose setting {sel['index'] + 1}: {sel['message']}",
              policy_text(StoredPolicy.from_json(report["policy"]))]
    versus = sel.get("versus_best_whole")
    if versus:
        best = versus["best_whole"]
        lines.append(f"best whole model on {versus['device']}: {best['precision']} ({_pct(best['accuracy'])} % on the "
                     f"calibration images, {best['latency_ms']:.4g} ms); the calibrated policy is expected at "
                     f"{versus['expected_latency_ms']:.4g} ms = {versus['ratio']:.3f} × it")
        if "warning" in versus:
            lines.append("WARNING: " + versus["warning"])
    if sel.get("caution"):
        lines.append("WARNING: " + sel["caution"])
    if report.get("kept"):
        lines.append("not written: " + report["kept"])
    else:
        lines.append(f"wrote {report['policy_file']} into {report['bundle']}" if report["written"] else "not written")
    return "\n".join(lines)


def profile_table(profile: dict[str, Any]) -> str:
    precs = sorted({b["precision"] for b in profile["blocks"]}, key=["fp32", "fp16", "int8"].index)
    by = {(b["block"], b["precision"]): b for b in profile["blocks"]}
    n = max(b["block"] for b in profile["blocks"]) + 1
    metered = any("energy" in b for b in profile["blocks"])

    def cell(e: dict[str, Any]) -> str:
        lat = f"{e['latency_ms']['p50_ms']:.4f} / {e['latency_ms']['p90_ms']:.4f}"
        return lat + (f" / {e['energy']['net_mj_per_inference']:.4g}" if metered and "energy" in e else "")

    rows = [[i] + [cell(by[i, p]) for p in precs] for i in range(n)]
    rows.append(["sum p50"] + [f"{sum(by[i, p]['latency_ms']['p50_ms'] for i in range(n)):.4f}" for p in precs])
    for p, w in profile.get("whole_model", {}).items():
        if p in precs:
            rows.append([f"whole {p}"] + [cell(w) if q == p else "" for q in precs])
    gaps = profile.get("runtime_overhead_ms", {})
    if gaps:
        rows.append(["gap/block"] + [f"{gaps[p]['value']:.4f}" if p in gaps else "" for p in precs])
    energy = profile["energy"]
    head = (f"device {profile['device']}: {profile['runtime']}, {profile['threads']} thread(s), "
            f"delegate {profile['delegate']}; energy: {energy['source']}")
    if "idle" in energy:
        head += f" (idle {energy['idle']['idle_w']:.3g} W)"
    unit = " / net mJ" if metered else ""
    out = head + "\n" + table(["block"] + [f"{p} p50/p90 ms{unit}" for p in precs], rows)
    trans = profile.get("transitions", [])
    if trans:
        ns = [t["latency_ms"]["p50_ms"] * 1e6 / t["elements"] for t in trans]
        out += (f"\nfloat<->int8 hand-overs: {len(trans)} timed, median {sorted(ns)[len(ns) // 2]:.2f} ns/element "
                f"({min(t['latency_ms']['p50_ms'] for t in trans) * 1e3:.1f}-"
                f"{max(t['latency_ms']['p50_ms'] for t in trans) * 1e3:.1f} µs each)")
    return out


def devices_table(devices: Iterable[DeviceDescriptor]) -> str:
    rows = []
    for d in devices:
        figs = d.figures().values()
        measured = sum(f.status == "measured" for f in figs)
        rows.append([d.name, ",".join(d.precisions) + (f" (+{d.host})" if d.host else ""),
                     " ".join(f"{p}:{f.value:g}" for p, f in d.throughput_gmacs.items()),
                     d.invoke_overhead_ms.value, f"{d.idle_w.value:g}/{d.active_w.value:g}",
                     f"{measured}/{len(figs)}", d.title[:60]])
    return table(["device", "precisions", "GMAC/s", "invoke ms", "idle/active W", "measured", "title"], rows)


def device_text(d: DeviceDescriptor) -> str:
    lines = [f"{d.name}: {d.title}", f"threads {d.threads}, runtime {d.runtime}, delegate {d.delegate}"
             + (f", other precisions on {d.host}" if d.host else "")]
    figs = d.figures()
    lines.append(table(["figure", "value", "status"], [[k, f.value, f.status] for k, f in figs.items()]))
    lines += ["sources:"] + [f"  {k}: {f.source}" for k, f in figs.items()]
    if d.notes:
        lines.append(d.notes)
    return "\n".join(lines)


def cost_table(models: Sequence[CostModel]) -> str:
    """Per block × precision latency (ms) and net energy (mJ) on each device, then where the numbers come from."""
    out = []
    for cm in models:
        ps = cm.precisions()
        by = {(r["block"], r["precision"]): r for r in cm.table()}
        n = cm.manifest.num_exits

        def cell(ms: float, mj: float | None) -> str:
            return f"{ms:.3f} / {'-' if mj is None else f'{mj:.3g}'}"

        rows = [[i] + [cell(by[i, p]["latency_ms"], by[i, p]["energy_mj"]) for p in ps] for i in range(n)]
        rows.append(["whole"] + [cell(cm.whole(p).latency_ms, cm.whole(p).energy_mj) for p in ps])
        sources = sorted({s for r in by.values() for s in (r["latency_source"], r["energy_source"])}
                         | {s for p in ps for s in (cm.whole(p).latency_source, cm.whole(p).energy_source)})
        out.append(cm.describe() + "\n" + table(["block"] + [f"{p} ms / net mJ" for p in ps], rows)
                   + "\nsources:\n" + "\n".join(f"  {s}" for s in sources))
    return "\n\n".join(out)


def bench_table(report: dict[str, Any]) -> str:
    machine = report.get("machine", {})
    lines = [f"{report['model']}: {report['n_images']} images, latency from {report['latency_samples']} per policy "
             f"in {report.get('rounds', 1)} interleaved round(s), {report['threads']} thread(s)"
             + (f", {machine['processor']} ({machine['int8_class']}: {' '.join(machine['cpu_flags']) or 'no int8 flags'})"
                if machine else "")]
    best = report.get("best_whole")
    base = best["latency_ms"] if best else None

    def ratio(ms: float) -> str:
        return "-" if base is None else f"{ms / base:.3f}"

    rows = [[f"whole {p}", "-", _pct(w["accuracy"]), w["latency_ms"], ratio(w["latency_ms"]), "-"]
            for p, w in report["whole_model"].items()]
    for pol in report["policies"]:
        t = pol["threshold"]
        rows.append([f"{pol['name']} {pol['precision']}", "inf" if t is None else t, _pct(pol["accuracy"]),
                     pol["mean_latency_ms"], ratio(pol["mean_latency_ms"]), " ".join(map(str, pol["exit_histogram"]))])
    lines.append(table(["policy", "threshold", "acc %", "latency ms", "÷ best whole", "exits taken (per exit)"], rows))
    if best:
        lines.append(f"best whole model here: {best['precision']} ({_pct(best['accuracy'])} %, {best['latency_ms']:.4g} ms;"
                     f" {best['rule']})")
    if report.get("split_overhead"):
        lines.append("split overhead (runtime loop, no early exit ÷ whole model): "
                     + ", ".join(f"{p} {v:.3f}" for p, v in report["split_overhead"].items()))
    if report.get("split_overhead_gated"):
        lines.append("  with a max-softmax gate evaluated after every exit (never firing): "
                     + ", ".join(f"{p} {v:.3f}" for p, v in report["split_overhead_gated"].items()))
    return "\n".join(lines)


def quickstart_text(report: dict[str, Any]) -> str:
    parts = [
        f"quickstart: {report['bundle']}",
        f"convert {report['convert_seconds']:.1f} s, profile {report['profile_seconds']:.1f} s, "
        f"calibrate {report['calibrate_seconds']:.1f} s, bench {report['bench_seconds']:.1f} s",
        "",
        profile_table(report["profile"]),
        "",
        calibrate_text(report["calibration"]),
        "",
        bench_table(report["bench"]),
        "",
        certified_line(report),
    ]
    return "\n".join(parts)


def certified_line(report: dict[str, Any]) -> str:
    """The quickstart's verdict, measured in its bench: the certified policy against the best whole model."""
    c, b = report["certified"], report["best_whole"]
    return (f"certified policy: {c['latency_ms']:.3f} ms vs best whole model ({b['precision']}): "
            f"{b['latency_ms']:.3f} ms → {b['latency_ms'] / c['latency_ms']:.2f} × faster, accuracy "
            f"{_pct(c['accuracy'])} % vs {_pct(b['accuracy'])} %")


def plot_bench(report: dict[str, Any], path: Path) -> None:
    """Accuracy vs mean measured latency, one curve per precision, whole models as stars."""
    matplotlib = require("matplotlib", extra="host")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    precs = sorted({p["precision"] for p in report["policies"]})
    for prec in precs:
        pts = sorted((p["mean_latency_ms"], 100 * p["accuracy"]) for p in report["policies"] if p["precision"] == prec)
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"threshold {prec}")
    for p, w in report["whole_model"].items():
        ax.plot(w["latency_ms"], 100 * w["accuracy"], "*", ms=12, label=f"whole model {p}")
    ax.set_xlabel(f"mean latency per image (ms, measured, {report['threads']} thread(s))")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{report['model']}: early exit × precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
