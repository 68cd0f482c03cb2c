"""``edgequee bench --report DIR``: one self-contained HTML page (plots inlined as base64 PNG, no external assets).

It shows every policy and baseline of a bench report (accuracy vs latency, and vs energy when the report has
it, with the Pareto front; exit histograms), the per-block × precision cost table of each device profile in
``BUNDLE/profiles/`` (priced by the cost model, sources named), and the stored policy's risk certificate if the
bundle has one. matplotlib (``camera`` extra) is imported only when a report is written.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from ._lazy import require
from .bundle import Bundle
from .cost import CostModel
from .errors import EdgequeeError

__all__ = ["REPORT_NAME", "pareto_front", "render_html", "write_html_report"]

REPORT_NAME = "index.html"
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.pareto td { background: #eef7ee; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; font-size: .9em; }
"""


# ---------------------------------------------------------------------------------------------- the data


def _group(p: dict[str, Any]) -> str:
    return f"{p.get('name', 'policy')} {p.get('precision', '')}".strip()


def _knob(p: dict[str, Any]) -> str:
    if "threshold" in p:
        return "inf" if p["threshold"] is None else f"{p['threshold']:g}"
    for key in ("knob", "lambda"):
        if p.get(key) is not None:
            return f"{key} {p[key]:g}"
    return "-"


def _points(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every policy and whole-model baseline as {label, group, accuracy, latency_ms, energy_mj, policy}."""
    pts = [{"label": f"whole model {p}", "group": f"whole model {p}", "accuracy": w["accuracy"],
            "latency_ms": w["latency_ms"], "energy_mj": w.get("energy_mj"), "policy": None}
           for p, w in report.get("whole_model", {}).items()]
    pts += [{"label": f"{_group(p)} {_knob(p)}", "group": _group(p), "accuracy": p["accuracy"],
             "latency_ms": p["mean_latency_ms"], "energy_mj": p.get("mean_energy_mj"), "policy": p}
            for p in report.get("policies", [])]
    return pts


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> list[bool]:
    """True for points no other point beats: lower-or-equal cost and higher-or-equal accuracy, one strictly."""
    pts = list(zip(costs, accuracies))
    return [not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in pts) for c, a in pts]


# --------------------------------------------------------------------------------------------------- html


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1,
           row_class: Sequence[str] | None = None) -> str:
    """An HTML table; the first ``left`` columns are left-aligned."""
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(_fmt(v))}</{tag}>"

    out = ["<table><tr>" + "".join(cell("th", i, h) for i, h in enumerate(headers)) + "</tr>"]
    for n, r in enumerate(rows):
        cls = f' class="{row_class[n]}"' if row_class and row_class[n] else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>")
    return "\n".join(out) + "</table>"


def _png(fig: Any) -> str:
    """A matplotlib figure as an inline <img> (base64 PNG); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _pareto_plot(report: dict[str, Any], pts: list[dict[str, Any]], cost: str, label: str) -> str:
    import matplotlib.pyplot as plt

    pts = [p for p in pts if p[cost] is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    groups = list(dict.fromkeys(p["group"] for p in pts if p["policy"] is not None))
    colors = plt.get_cmap("tab10")
    for gi, g in enumerate(groups):
        xy = sorted((p[cost], 100 * p["accuracy"]) for p in pts if p["group"] == g)
        ax.plot(*zip(*xy), marker="o", ms=4, lw=1.2, color=colors(gi % 10), label=g)
    for k, p in enumerate(p for p in pts if p["policy"] is None):
        ax.plot(p[cost], 100 * p["accuracy"], "*", ms=14, mec="k", color=colors((len(groups) + k) % 10),
                label=p["label"])
    on = pareto_front([p[cost] for p in pts], [p["accuracy"] for p in pts])
    front = sorted((p[cost], 100 * p["accuracy"]) for p, f in zip(pts, on) if f)
    ax.step(*zip(*front), where="post", color="grey", ls="--", lw=1, label="Pareto front", zorder=0)
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{report['model']}: accuracy vs {label.split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _exit_plot(report: dict[str, Any]) -> str:
    """Per policy group, one horizontal bar per knob value, split by the share of images leaving at each exit."""
    import matplotlib.pyplot as plt

    policies = report.get("policies", [])
    groups = list(dict.fromkeys(_group(p) for p in policies))
    n_exits = max(len(p["exit_histogram"]) for p in policies)
    cols = min(3, len(groups))
    rows_n = math.ceil(len(groups) / cols)
    height = max(len([p for p in policies if _group(p) == g]) for g in groups) * 0.32 + 1.4
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, height * rows_n), squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    for ax, g in zip(axes.flat, groups):
        ps = [p for p in policies if _group(p) == g]
        for y, p in enumerate(ps):
            h = p["exit_histogram"]
            left = 0.0
            for e, count in enumerate(h):
                share = count / max(1, sum(h))
                ax.barh(y, share, left=left, color=cmap(e / max(1, n_exits - 1)), edgecolor="white", lw=0.5,
                        label=f"exit {e + 1}" if y == 0 else None)
                left += share
        ax.set_yticks(range(len(ps)), [_knob(p) for p in ps], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(g, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of images")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("knob (threshold)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(n_exits, 9), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (height * rows_n)))
    return _png(fig)


def _policy_table(report: dict[str, Any], pts: list[dict[str, Any]], total_macs: float) -> str:
    on = pareto_front([p["latency_ms"] for p in pts], [p["accuracy"] for p in pts])
    energy = any(p["energy_mj"] is not None for p in pts)
    rows, classes = [], []
    for p, front in zip(pts, on):
        pol = p["policy"] or {}
        row = [p["group"], _knob(pol) if pol else "-", 100 * p["accuracy"], p["latency_ms"]]
        row += [p["energy_mj"]] if energy else []
        row += [100 * pol["mean_macs"] / total_macs if "mean_macs" in pol else None,
                " ".join(map(str, pol.get("exit_histogram", []))) or "-", "yes" if front else ""]
        rows.append(row)
        classes.append("pareto" if front else "")
    heads = ["policy", "knob", "accuracy %", "mean latency ms"] + (["mean energy mJ"] if energy else [])
    heads += ["MACs % of whole", "exits taken (per exit)", "Pareto"]
    return _table(heads, rows, left=2, row_class=classes)


def _exit_accuracy(report: dict[str, Any], bundle: Bundle) -> str:
    acc = report.get("exit_accuracy", {})
    cum = bundle.manifest.cumulative_macs()
    rows = [[i + 1, 100 * c / cum[-1]] + [100 * acc[p][i] for p in acc] for i, c in enumerate(cum)]
    return _table(["exit", "cumulative MACs %"] + [f"{p} accuracy %" for p in acc], rows)


def _cost_tables(bundle: Bundle) -> str:
    files = sorted(bundle.profiles_dir.glob("*.json"), key=lambda f: f.stem) if bundle.profiles_dir.is_dir() else []
    if not files:
        return '<p class="note">No device profile in this bundle (make one with <code>edgequee profile</code>).</p>'
    out = []
    m = bundle.manifest
    for f in files:
        try:
            cm = CostModel.for_bundle(bundle, f.stem)
            table = cm.table()
            precs = cm.precisions()
            whole = {p: cm.whole(p) for p in precs}
        except (EdgequeeError, KeyError, TypeError, ValueError) as e:
            out.append(f"<h3>{html.escape(f.name)}</h3><p class='note'>cannot read it: {html.escape(str(e))}</p>")
            continue
        prof = cm.profile or {}
        by = {(r["block"], r["precision"]): r for r in table}
        energy = any(r["energy_mj"] is not None for r in table)
        heads = ["block", "MMACs"] + [f"{p} ms" for p in precs] + ([f"{p} mJ" for p in precs] if energy else [])
        rows = [[i, b.macs / 1e6] + [by[i, p]["latency_ms"] for p in precs]
                + ([by[i, p]["energy_mj"] for p in precs] if energy else []) for i, b in enumerate(m.blocks)]
        rows.append(["whole model", sum(b.macs for b in m.blocks) / 1e6] + [whole[p].latency_ms for p in precs]
                    + ([whole[p].energy_mj for p in precs] if energy else []))
        sources = sorted({s for r in table for s in (r["latency_source"], r["energy_source"]) if s}
                         | {s for c in whole.values() for s in (c.latency_source, c.energy_source) if s})
        meta = ", ".join(f"{k} {prof[k]}" for k in ("runtime", "threads", "delegate", "created") if k in prof)
        out.append(f"<h3>{html.escape(cm.name)} <span class='note'>({html.escape(f.name)}; {html.escape(meta)})"
                   f"</span></h3>" + _table(heads, rows)
                   + "<p class='note'>sources: " + "<br>".join(html.escape(s) for s in sources) + "</p>")
    return "\n".join(out)


def _certificate(bundle: Bundle) -> str:
    """The stored policy and its risk certificate (``Bundle.policy()``), or why there is none."""
    try:
        stored = bundle.policy()
    except EdgequeeError as e:
        return f"<p class='note'>the stored policy cannot be read: {html.escape(str(e))}</p>"
    if stored is None or stored.certificate is None:
        what = "no stored policy" if stored is None else f"the stored policy {html.escape(stored.name)} has none"
        return f'<p class="note">no certificate ({what}; <code>edgequee calibrate</code> writes one).</p>'
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in stored.params.items())
    rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
            for k, v in dataclasses.asdict(stored.certificate).items()]
    return (f"<p>stored policy <b>{html.escape(stored.name)}</b>({html.escape(params)}), knob "
            f"{html.escape(str(stored.knob))}</p>" + _table(["field", "value"], rows, left=2))


def _headline(pts: list[dict[str, Any]]) -> str:
    """The fastest policy within 1 point of the most accurate whole model."""
    whole = [p for p in pts if p["policy"] is None]
    if not whole:
        return ""
    ref = max(whole, key=lambda p: p["accuracy"])
    ok = [p for p in pts if p["policy"] is not None and p["accuracy"] >= ref["accuracy"] - 0.01]
    if not ok:
        return ""
    best = min(ok, key=lambda p: p["latency_ms"])
    return (f"<p><b>Fastest policy within 1 point of the {html.escape(ref['label'])}</b> "
            f"({100 * ref['accuracy']:.2f} %, {ref['latency_ms']:.3f} ms): {html.escape(best['label'])} at "
            f"{100 * best['accuracy']:.2f} % and {best['latency_ms']:.3f} ms "
            f"({ref['latency_ms'] / best['latency_ms']:.2f}× faster).</p>")


def render_html(report: dict[str, Any], bundle: Bundle) -> str:
    """The whole page as one string."""
    matplotlib = require("matplotlib", extra="camera")
    matplotlib.use("Agg")
    pts = _points(report)
    m = bundle.manifest
    total_macs = float(sum(b.macs for b in m.blocks))
    plots = [_pareto_plot(report, pts, "latency_ms", f"mean latency per image (ms, measured, {report['threads']} "
                                                     "thread(s))")]
    if any(p["energy_mj"] is not None for p in pts):
        plots.append(_pareto_plot(report, pts, "energy_mj", "mean energy per image (mJ)"))
    split = report.get("split_overhead") or {}
    gated = report.get("split_overhead_gated") or {}
    e = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>edgequee bench: {e(report['model'])}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>edgequee bench: {e(report['model'])}</h1>",
        f"<p class='note'>bundle {e(str(bundle.path))}; {m.num_exits} blocks, precisions {e(', '.join(m.precisions))}; "
        f"{report['n_images']} test images, latency timed in the runtime loop on {report['latency_samples']} per "
        f"policy, {report['threads']} thread(s); written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p>",
        _headline(pts),
        "<h2>Accuracy vs cost</h2>",
        *plots,
        "<p class='note'>Stars: the unsplit model. Dashed: the Pareto front over everything shown; its points are "
        "shaded in the table.</p>",
        _policy_table(report, pts, total_macs),
    ]
    if split:
        parts.append("<p class='note'>split overhead (runtime loop with every block, no early exit ÷ whole model): "
                     + e(", ".join(f"{p} {v:.3f}" for p, v in split.items()))
                     + (("; with a max-softmax gate after every exit that never fires: "
                         + e(", ".join(f"{p} {v:.3f}" for p, v in gated.items()))) if gated else "") + "</p>")
    if report.get("policies"):
        parts += ["<h2>Exits taken</h2>", _exit_plot(report)]
    if report.get("exit_accuracy"):
        parts += ["<h2>Accuracy of each exit</h2>", _exit_accuracy(report, bundle)]
    parts += ["<h2>Cost per block × precision</h2>", _cost_tables(bundle),
              "<h2>Risk certificate</h2>", _certificate(bundle), "</body></html>"]
    return "\n".join(p for p in parts if p)


def write_html_report(report: dict[str, Any], bundle: Bundle, out_dir: Path) -> Path:
    """Write ``out_dir/index.html`` (atomically) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(report, bundle), encoding="utf-8")
    os.replace(tmp, path)
    return path
