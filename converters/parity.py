"""Parity of converted graphs against torch: isolated (each block fed torch's activations) and chained."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from edgequee.backend import Graph
from edgequee.bundle import BlockParity, Bundle, ChainedParity
from edgequee.quant import dequantize, quantize
from edgequee.policies import ThresholdPolicy
from edgequee.runtime import EdgeRunner
from edgequee.progress import Progress

from .export import nhwc
from .multiexit import MultiExitModel

__all__ = ["isolated_parity", "chained_parity", "torch_exit_logits"]


def _run_graph(graph: Graph, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Feed every row of ``x_nhwc`` (float) through ``graph``; return every output, dequantized, by role."""
    art = graph.artifact
    qin = art.input.quant
    out: dict[str, list[np.ndarray]] = {role: [] for role in graph.outputs}
    for row in x_nhwc:
        if qin is None:
            np.copyto(graph.input[0], row)
        else:
            quantize(row, qin, out=graph.input[0])
        graph.invoke()
        for role, store in out.items():
            v, qp = graph.outputs[role][0], art.outputs[role].quant
            store.append(dequantize(v, qp) if qp is not None else v.copy())
    return {role: np.stack(v) for role, v in out.items()}


def torch_exit_logits(model: MultiExitModel, images_uint8: np.ndarray, batch: int = 250) -> np.ndarray:
    """(N, num_exits, num_classes) float32 logits of every exit, from torch."""
    out = []
    with torch.no_grad():
        for s in range(0, len(images_uint8), batch):
            x = model.normalize(torch.from_numpy(images_uint8[s : s + batch]))
            out.append(torch.stack(model(x), 1).numpy())
    return np.concatenate(out).astype(np.float32)


def isolated_parity(
    model: MultiExitModel,
    bundle: Bundle,
    images_uint8: np.ndarray,
    precisions: Sequence[str],
    num_threads: int = 1,
    progress: Progress | None = None,
) -> list[BlockParity]:
    """Each block × precision fed the exact torch activations: exit top-1 agreement and max abs errors.

    The exit's logits are taken as the runtime takes them: from the graph, or (int8) the float classifier.
    """
    heads = bundle.heads()
    results = []
    total, done = len(model.blocks) * len(precisions), 0
    with torch.no_grad():
        h = model.normalize(torch.from_numpy(images_uint8))
        for i, (block, head) in enumerate(zip(model.blocks, model.heads)):
            h_next = block(h)
            f_ref = head.features(h_next)
            top_ref = head.classifier(f_ref).argmax(1).numpy()
            x = nhwc(h)
            for p in precisions:
                art = bundle.block_artifact(i, p)
                graph = Graph.open(bundle.file(art), art, num_threads)
                outs = _run_graph(graph, x)
                hid, feats = outs.get("hidden"), outs["features"]
                w, b = heads[i]
                top = (feats @ w.T + b if art.float_head else outs["logits"]).argmax(1)
                results.append(
                    BlockParity(
                        block=i,
                        precision=p,
                        exit_agreement=float((top == top_ref).mean()),
                        hidden_max_abs_err=None if hid is None else float(np.abs(hid - nhwc(h_next)).max()),
                        features_max_abs_err=float(np.abs(feats - f_ref.numpy()).max()),
                    )
                )
                done += 1
                if progress:
                    progress(done, total, f"parity block {i} {p}")
            h = h_next
    return results


def chained_parity(
    bundle: Bundle,
    torch_logits: np.ndarray,
    images_uint8: np.ndarray,
    labels: np.ndarray | None,
    precisions: Sequence[str],
    num_threads: int = 1,
) -> list[ChainedParity]:
    """All blocks at one precision from the image, through the real runtime: agreement (and accuracy) per exit."""
    runner = EdgeRunner(bundle, ThresholdPolicy(precisions[0]), num_threads=num_threads)
    ref = torch_logits.argmax(2)
    out = []
    for p in precisions:
        top = runner.all_exits(images_uint8, [p] * bundle.manifest.num_exits).argmax(2)
        acc = tuple(float(a) for a in (top == labels[:, None]).mean(0)) if labels is not None else None
        out.append(ChainedParity(p, tuple(float(a) for a in (top == ref).mean(0)), acc))
    return out
