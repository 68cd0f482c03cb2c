"""JEI-DNN training (arXiv 2310.09163): exit heads and gates learned jointly on a frozen backbone. Host side (torch).

Follows the official code (networkslab/dynn; notes/papers.md §1), on cached exit-head inputs
(``converters.train``'s cache: one backbone pass, then every step is a few small matmuls):

1. Warm-up: the exit heads alone, summed cross-entropies (``train_heads``' recipe; skip it for trained heads).
2. Bi-level, alternating every ``phase_batches`` batches, gate phase first:
   - gate phase: targets t_l = 1[l ≥ l*] with l* = argmin_l CE_l + λ·c_l over every exit (the last one included),
     where c_l is the cumulative cost of blocks 0..l **on the chosen device** from edgequee's cost model, normalised
     so the whole network costs 1 (``exit_costs``). Loss: mean of w·BCE(gate logit, t), w = pos_weight_l on
     positives, pos_weight_l = min((N − n_l)/max(n_l, 0.1), 5) with n_l the validation samples whose l* = l
     (recomputed every epoch). Heads get no gradient.
   - classifier phase: the intermediate heads (the last exit is the backbone's own, frozen) on
     ``loss="weighted"``: mean P_l·CE_l with P_l = max(0, min(g_l, 1 − Σ_{j<l} g_j)) from the (fixed) gates, the
     loss the paper describes; or ``"unweighted"``: mean CE_l, what the official code's loss reduces to (its
     P-weighted sum is multiplied by an undetached ΣCE/ΣP·CE ratio).
   Gates are linear on the four softmax statistics of their exit (``edgequee.features``, detached), so they run
   on the device as 5 floats each (``edgequee.jei.JeiPolicy``).

Adam is used for both parts (the official code: SGD 0.01): Adam's per-parameter scaling keeps the P-weighted
loss, whose magnitude is a fraction of the unweighted one, on the same effective step size, so the two losses
differ only in how they weigh samples. Heads train on standardised inputs as in ``train_heads``.

Gate targets come from the heads' cross-entropies on training images. Heads that fit their training images much
better than unseen ones (pool heads on ResNet-56: 96 % vs 84 % at exit 7) make deeper exits look better than they
are; the held-out ``val_fraction`` only sets the pos-weights. Likewise the conformal q̂ stored with the policy is
fitted on that split, which is held out from this training but not from an earlier warm-up of the same heads on
all images: ``edgequee calibrate`` refits it on calibration data.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgequee.bundle import load_bundle
from edgequee.cost import CostModel
from edgequee.errors import ConversionError, DataError
from edgequee.features import softmax_stats
from edgequee.jei import RULES, JeiPolicy, exit_probabilities
from edgequee.policies import Traces, softmax
from edgequee.uncertainty import ece, fit_conformal

from .multiexit import MultiExitModel, read_checkpoint
from .train import _CACHE_BATCH, _batches, _build_cache, _check_data, _fit, _make_optimizer, _split_head, _Standardizer

__all__ = ["LOSSES", "ExitCosts", "exit_costs", "cache_exit_inputs", "logits_from_cache", "gate_targets",
           "pos_weights", "gate_loss", "head_loss", "Gates", "train_jei", "jei_policy"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
LOSSES = ("weighted", "unweighted")
DEFAULT_THRESHOLD = 0.5  # the paper's operating point
_WARMUP_BATCH = 256  # train_heads' batch size: the warm-up is its recipe


@dataclass(frozen=True)
class ExitCosts:
    """c_l: cumulative cost of blocks 0..l at ``precision`` on ``device``, normalised (last = 1), and its origin."""

    values: tuple[float, ...]
    raw: tuple[float, ...]  # the same in the objective's unit (ms or mJ)
    device: str
    objective: str
    precision: str
    source: str
    bundle: str


def exit_costs(model: MultiExitModel, bundle_path: str | Path, device: str, *, precision: str = "fp32",
               objective: str = "latency") -> ExitCosts:
    """Exit costs from edgequee's cost model of a bundle of the same backbone (head weights do not change block
    costs): ``CostModel.for_bundle(bundle, device).path([precision] * (l + 1))`` for every exit l."""
    if objective not in ("latency", "energy"):
        raise DataError(f"objective {objective!r}: choose latency or energy")
    bundle = load_bundle(bundle_path, verify=False)
    m = bundle.manifest
    theirs = m.conversion.get("model_config", {})
    if m.num_exits != model.num_exits or any(theirs.get(k) != model.config.get(k) for k in ("arch", "exits")):
        raise ConversionError(
            f"{bundle_path} holds {theirs.get('arch')} exits={theirs.get('exits')} ({m.num_exits} blocks), the model "
            f"is {model.config.get('arch')} exits={model.config.get('exits')} ({model.num_exits} blocks): --cost-from "
            "needs a bundle converted from the same backbone and exit placement")
    if precision not in m.precisions:
        raise ConversionError(f"{bundle_path} has no {precision} blocks (has {', '.join(m.precisions)})")
    cm = CostModel.for_bundle(bundle, device, objective=objective)
    paths = [cm.path([precision] * (i + 1)) for i in range(m.num_exits)]
    raw = [cm.value(c) for c in paths]
    source = paths[-1].latency_source if objective == "latency" else paths[-1].energy_source
    return ExitCosts(tuple(r / raw[-1] for r in raw), tuple(raw), cm.name, objective, precision, source,
                     str(bundle_path))


def cache_exit_inputs(model: MultiExitModel, x: np.ndarray, *, max_bytes: int = 4 << 30,
                      progress: Progress | None = None) -> list[torch.Tensor]:
    """One frozen-backbone pass: every exit head's input after its parameter-free prefix, float16 (N, ...) each."""
    _check_data(model, x)
    model.eval()
    prefixes = [_split_head(h)[0] for h in model.heads]
    total, done = math.ceil(len(x) / _CACHE_BATCH), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    cache = _build_cache(model, torch.from_numpy(x), list(range(model.num_exits)), prefixes, _CACHE_BATCH,
                         max_bytes, tick)
    if cache is None:
        raise DataError(f"the exit-head inputs of {len(x)} images exceed {max_bytes / 1e9:.1f} GB; use fewer "
                        "training images (--n-train)")
    return cache


def gate_targets(ce: torch.Tensor, cost: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(l* (N,), targets (N, L-1)): l* = argmin_l CE_l + λ·c_l over all L exits (first on ties); t_l = 1[l ≥ l*]."""
    best = torch.argmin(ce + lam * cost, dim=1)
    gates = torch.arange(ce.shape[1] - 1, device=ce.device)
    return best, (gates[None, :] >= best[:, None]).to(ce.dtype)


def pos_weights(best: torch.Tensor, num_gates: int, cap: float = 5.0) -> torch.Tensor:
    """pos_weight_l = min((N − n_l) / max(n_l, 0.1), cap), n_l = samples whose optimal exit l* is l."""
    n_l = torch.bincount(best, minlength=num_gates + 1)[:num_gates].double()
    return torch.clamp((len(best) - n_l) / torch.clamp(n_l, min=0.1), max=cap).float()


def gate_loss(gate_logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Mean over samples and gates of w·BCE-with-logits, w = pos_weight_l where the target is 1, else 1."""
    bce = F.binary_cross_entropy_with_logits(gate_logits, targets, reduction="none")
    return (torch.where(targets > 0, pos_weight[None, :], torch.ones_like(bce)) * bce).mean()


def head_loss(ce: torch.Tensor, p_exit: torch.Tensor, loss: str) -> torch.Tensor:
    """Intermediate heads' loss from per-sample CE (N, L-1): mean P_l·CE_l (``weighted``, P detached) or mean CE_l."""
    if loss == "weighted":
        return (p_exit.detach() * ce).mean()
    if loss == "unweighted":
        return ce.mean()
    raise DataError(f"loss={loss!r}; valid: {', '.join(LOSSES)}")


class Gates(nn.Module):
    """One 4→1 linear gate per intermediate exit: logits (N, L-1) from softmax statistics (N, L-1, 4)."""

    def __init__(self, num_gates: int, generator: torch.Generator | None = None):
        super().__init__()
        # nn.Linear(4, 1)'s default initialisation: U(−1/√4, 1/√4) for weights and bias
        self.weight = nn.Parameter(torch.rand(num_gates, 4, generator=generator) - 0.5)
        self.bias = nn.Parameter(torch.rand(num_gates, generator=generator) - 0.5)

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return (stats * self.weight).sum(-1) + self.bias

    def export(self) -> np.ndarray:
        """(L-1, 5) float64 = [w (4), b] per gate: ``JeiPolicy``'s ``arrays["gates"]``."""
        return torch.cat([self.weight, self.bias[:, None]], 1).detach().double().numpy()


def _stats(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Detached softmax statistics (N, len(logits), 4) of the exits' logits (edgequee.features, float32)."""
    z = torch.stack([lg.detach() for lg in logits], 1).numpy()
    return torch.from_numpy(softmax_stats(z).astype(np.float32))


def train_jei(
    model: MultiExitModel,
    x: np.ndarray,
    y: np.ndarray,
    cost: ExitCosts,
    *,
    lam: float = 0.5,
    loss: str = "weighted",
    rule: str = "gate",
    warmup_epochs: int = 0,
    epochs: int = 10,
    batch_size: int = 64,
    phase_batches: int = 200,
    lr: float = 1e-4,
    gate_lr: float = 1e-2,
    warmup_lr: float = 1e-3,
    val_fraction: float = 0.1,
    alpha: float = 0.1,
    seed: int = 0,
    features: Sequence[torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train ``model``'s intermediate exit heads (in place) and JEI gates on a frozen backbone; see the module doc.

    ``val_fraction`` of the images (seeded) is held out for the gates' pos-weights, the per-epoch validation and the
    conformal q̂ stored with the policy. ``features``: the output of ``cache_exit_inputs(model, x)`` when already
    computed. ``rule``: the stored policy's exit rule (``edgequee.jei``; training does not depend on it).
    Returns a JSON-ready report whose ``policy`` entry is what ``jei_policy`` rebuilds the policy from.
    """
    if loss not in LOSSES:
        raise DataError(f"loss={loss!r}; valid: {', '.join(LOSSES)}")
    if rule not in RULES:
        raise DataError(f"rule={rule!r}; valid: {', '.join(RULES)}")
    _check_data(model, x, y)
    num_exits = model.num_exits
    if num_exits < 2:
        raise DataError("JEI needs at least two exits")
    if len(cost.values) != num_exits:
        raise DataError(f"{len(cost.values)} exit costs for {num_exits} exits")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    n_val = max(1, int(round(val_fraction * len(x))))
    val, tr = order[:n_val], order[n_val:]
    steps = math.ceil(len(tr) / batch_size)
    total = ((0 if features is not None else math.ceil(len(x) / _CACHE_BATCH)) + steps * epochs
             + math.ceil(len(tr) / _WARMUP_BATCH) * warmup_epochs)
    done = 0

    def tick(_done: int = 0, _total: int = 0) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    cache = list(features) if features is not None else cache_exit_inputs(model, x, progress=tick)
    if len(cache) != num_exits or any(len(c) != len(x) for c in cache):
        raise DataError("features: expected cache_exit_inputs(model, x) of these images")
    labels = torch.from_numpy(y.astype(np.int64))
    rests = [_split_head(h)[1] for h in model.heads]
    heads = [nn.Sequential(rest, head.classifier) for rest, head in zip(rests[:-1], model.heads[:-1])]
    final = nn.Sequential(rests[-1], model.heads[-1].classifier).eval()
    with torch.no_grad():
        final_logits = torch.cat([final(cache[-1][i : i + 4096].float()) for i in range(0, len(x), 4096)])
    scalers = [_Standardizer(m[1], c[tr[:5000]].float()) if len(m[0]) == 0 and c.ndim == 2 else None
               for m, c in zip(heads, cache)]

    def inputs(rows: torch.Tensor) -> list[torch.Tensor]:
        return [sc(c[rows].float()) if sc else c[rows].float() for sc, c in zip(scalers, cache)]

    def head_logits(rows: torch.Tensor) -> list[torch.Tensor]:
        return [m(v) for m, v in zip(heads, inputs(rows))]

    cost_t = torch.tensor(cost.values, dtype=torch.float32)
    gates = Gates(num_exits - 1, gen)
    report: dict[str, Any] = {"lam": lam, "loss": loss, "rule": rule, "cost": asdict(cost), "n_train": int(len(tr)),
                              "n_val": int(n_val), "seed": seed, "history": []}
    try:
        if warmup_epochs > 0:
            opt = _make_optimizer("adam", [p for m in heads for p in m.parameters()], warmup_lr, 0.0)
            history, _ = _fit(heads, lambda idx: inputs(tr[idx]), labels[tr], opt, warmup_epochs, _WARMUP_BATCH,
                              seed, tick)
            report["warmup_loss_history"] = history
        opt_h = torch.optim.Adam([p for m in heads for p in m.parameters()], lr=lr)
        opt_g = torch.optim.Adam(gates.parameters(), lr=gate_lr)
        n_gate = sum(1 for b in range(steps * epochs) if (b // phase_batches) % 2 == 0)  # gate phase first
        sched = {o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(1, n)) for o, n in
                 ((opt_g, n_gate), (opt_h, steps * epochs - n_gate))}
        gate_phase, batch_no = True, 0
        for epoch in range(epochs):
            val_logits = _all_logits(head_logits, final_logits, val)
            best_val, _ = gate_targets(exit_ce(torch.from_numpy(val_logits), labels[val]), cost_t, lam)
            pw = pos_weights(best_val, num_exits - 1)
            sums = {"gate": [0.0, 0], "heads": [0.0, 0]}
            for idx in _batches(len(tr), batch_size, gen):
                rows = tr[idx]
                yb = labels[rows]
                if gate_phase:
                    with torch.no_grad():
                        lg = head_logits(rows)
                        ce = exit_ce(torch.stack(lg + [final_logits[rows]], 1), yb)
                    _, targets = gate_targets(ce, cost_t, lam)
                    value = gate_loss(gates(_stats(lg)), targets, pw)
                    opt = opt_g
                else:
                    lg = head_logits(rows)
                    with torch.no_grad():
                        p_exit = torch.from_numpy(exit_probabilities(torch.sigmoid(gates(_stats(lg))).numpy()))
                    value = head_loss(exit_ce(torch.stack(lg, 1), yb), p_exit.float(), loss)
                    opt = opt_h
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                sched[opt].step()
                acc = sums["gate" if gate_phase else "heads"]
                acc[0] += value.item() * len(idx)
                acc[1] += len(idx)
                batch_no += 1
                if batch_no % phase_batches == 0:
                    gate_phase = not gate_phase
                tick()
            ev = _evaluate(_all_logits(head_logits, final_logits, val), labels[val].numpy(), gates.export(), cost,
                           rule)
            report["history"].append({"epoch": epoch + 1, "gate_loss": sums["gate"][0] / max(sums["gate"][1], 1),
                                      "head_loss": sums["heads"][0] / max(sums["heads"][1], 1),
                                      "pos_weight": pw.tolist(), **ev})
            log.info("jei epoch %d: val accuracy %.4f at mean cost %.3f", epoch + 1, ev["accuracy"], ev["mean_cost"])
    finally:
        for sc in scalers:
            if sc:
                sc.fold()
    model.eval()
    val_logits = logits_from_cache(model, cache, val)
    y_val = labels[val].numpy()
    gate_array = gates.export()
    report["val"] = _evaluate(val_logits, y_val, gate_array, cost, rule)
    exits = report["val"].pop("exits")
    for h in report["history"]:
        h.pop("exits")
    conformal = fit_conformal(softmax(val_logits), y_val, np.asarray(exits), alpha, knob=DEFAULT_THRESHOLD)
    policy = JeiPolicy(cost.precision, DEFAULT_THRESHOLD, arrays={"gates": gate_array}, conformal=conformal.to_json(),
                       rule=rule,
                       trained={"lam": lam, "loss": loss, "exit_cost": list(cost.values), "device": cost.device,
                                "objective": cost.objective, "cost_source": cost.source, "n_train": int(len(tr)),
                                "conformal_data": f"validation split of training ({n_val} images)"})
    report["policy"] = {"params": policy.params(), "gates": gate_array.tolist()}
    report["seconds"] = time.perf_counter() - t0
    return report


def logits_from_cache(model: MultiExitModel, cache: Sequence[torch.Tensor],
                      rows: torch.Tensor | None = None) -> np.ndarray:
    """Every exit's logits (N, L, C) from ``cache_exit_inputs`` features (of ``rows``, default all), no grad."""
    heads = [nn.Sequential(_split_head(h)[1], h.classifier) for h in model.heads]
    idx = torch.arange(len(cache[0])) if rows is None else rows
    with torch.no_grad():
        return torch.cat([torch.stack([m(c[idx[i : i + 4096]].float()) for m, c in zip(heads, cache)], 1)
                          for i in range(0, len(idx), 4096)]).numpy()


def _all_logits(head_logits: Callable[[torch.Tensor], list[torch.Tensor]], final_logits: torch.Tensor,
                rows: torch.Tensor) -> np.ndarray:
    """(N, L, C) numpy logits of every exit for ``rows`` (no grad)."""
    with torch.no_grad():
        parts = [torch.stack(head_logits(rows[i : i + 4096]) + [final_logits[rows[i : i + 4096]]], 1)
                 for i in range(0, len(rows), 4096)]
    return torch.cat(parts).numpy()


def exit_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-exit cross-entropy (N, L) of logits (N, L, C)."""
    return F.cross_entropy(logits.permute(0, 2, 1), labels[:, None].expand(-1, logits.shape[1]), reduction="none")


def _evaluate(logits: np.ndarray, labels: np.ndarray, gates: np.ndarray, cost: ExitCosts,
              rule: str) -> dict[str, Any]:
    """The device's exit ``rule`` at the paper's threshold on (N, L, C) logits: accuracy, mean cost, ECE, exits."""
    policy = JeiPolicy(cost.precision, DEFAULT_THRESHOLD, arrays={"gates": gates}, rule=rule)
    d = policy.exits_for_knob(Traces({cost.precision: logits}), DEFAULT_THRESHOLD,
                              {cost.precision: np.diff(cost.values, prepend=0.0)})
    probs = softmax(d.logits)
    correct = probs.argmax(1) == labels
    return {"accuracy": float(correct.mean()), "mean_cost": float(d.cost.mean()), "ece": ece(probs.max(1), correct),
            "exit_histogram": np.bincount(d.exit, minlength=logits.shape[1]).tolist(),
            "exit_accuracy": [float(a) for a in (logits.argmax(2) == labels[:, None]).mean(0)],
            "exits": d.exit.tolist()}


def jei_policy(checkpoint: str | Path) -> JeiPolicy | None:
    """The JEI policy saved in a checkpoint by ``edgequee train --method jei``; None for other checkpoints."""
    path = Path(checkpoint)
    if not path.is_file():
        return None
    ckpt = read_checkpoint(path)  # weights_only: a crafted pickle is refused before it can run
    extra = ckpt.get("extra") if isinstance(ckpt, dict) else None
    spec = extra.get("jei") if isinstance(extra, dict) else None
    if not spec:
        return None
    return JeiPolicy(**spec["params"], arrays={"gates": np.asarray(spec["gates"], np.float64)})
