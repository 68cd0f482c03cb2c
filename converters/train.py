"""Training of multi-exit models: exit heads on a frozen backbone, joint fine-tuning, per-exit evaluation.

Library code for ``edgequee train`` (which owns the terminal): images arrive as uint8 NHWC numpy arrays and int64
labels; ``model.normalize`` turns them into the float NCHW input. Long loops report through an optional
``progress(done, total)`` callback and log through ``logging``; nothing here prints.

``train_heads`` runs the frozen backbone once and caches each exit head's *input after its parameter-free prefix*
(for the built-in heads that is the whole pooled feature vector: 2·C·4·4 floats for "pool", C for "linear", stored as
float16), then trains the heads on the cache: ResNet-56 with 9 exits on 45k images is one backbone pass (~5 min on
two CPU cores) plus a few seconds per epoch. If the cache would exceed ``max_cache_bytes`` it streams instead (one
backbone pass per epoch). A head whose Linear reads the cache directly is trained on standardised inputs and the
scaling is folded back into its weights afterwards (exact), so one learning rate suits every head type: without it,
"linear" heads on tiny global-average features need ~30× the learning rate of "pool" heads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgequee.data import crop_flip
from edgequee.errors import DataError

from .multiexit import MultiExitModel

__all__ = ["train_heads", "finetune_joint", "evaluate", "exit_logits"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

_CACHE_BATCH = 500  # images per backbone pass when caching head inputs


def _check_data(model: MultiExitModel, x: np.ndarray, y: np.ndarray | None = None) -> None:
    s = model.input_spec
    want = (s.height, s.width, s.channels)
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise DataError(f"images: got {x.dtype} {x.shape}, expected uint8 (N, {want[0]}, {want[1]}, {want[2]}) NHWC")
    if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"labels: got {y.dtype} {y.shape}, expected integer ({len(x)},)")
    if y is not None and len(y) and (y.min() < 0 or y.max() >= len(model.classes)):
        raise DataError(f"labels span {y.min()}..{y.max()}, the model has {len(model.classes)} classes")


def _batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def _set_threads(num_threads: int | None) -> None:
    if num_threads is not None:
        torch.set_num_threads(num_threads)


@torch.no_grad()
def exit_logits(
    model: MultiExitModel, x: np.ndarray, *, batch_size: int = 500, progress: Progress | None = None
) -> np.ndarray:
    """Logits of every exit, float32 (num_exits, N, num_classes); eval mode, no grad."""
    _check_data(model, x)
    model.eval()
    images = torch.from_numpy(x)
    out = np.empty((model.num_exits, len(x), len(model.classes)), np.float32)
    total = math.ceil(len(x) / batch_size)
    for b, idx in enumerate(_batches(len(x), batch_size)):
        for e, logits in enumerate(model(model.normalize(images[idx]))):
            out[e, idx.numpy()] = logits.numpy()
        if progress:
            progress(b + 1, total)
    return out


def evaluate(
    model: MultiExitModel, x: np.ndarray, y: np.ndarray, batch_size: int = 500, progress: Progress | None = None
) -> list[float]:
    """Top-1 accuracy (fraction, 0–1) of every exit on uint8 NHWC images ``x`` with labels ``y``."""
    _check_data(model, x, y)
    logits = exit_logits(model, x, batch_size=batch_size, progress=progress)
    return [float((lg.argmax(1) == y).mean()) for lg in logits]


def _split_head(head: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(parameter-free prefix of ``head.features``, the rest of it): the prefix's output is what gets cached."""
    features = head.features
    if not isinstance(features, nn.Sequential):
        has_params = any(True for _ in features.parameters())
        return (nn.Sequential(), features) if has_params else (features, nn.Sequential())
    mods = list(features)
    k = 0
    while k < len(mods) and not any(True for _ in mods[k].parameters()) and not list(mods[k].buffers()):
        k += 1
    return nn.Sequential(*mods[:k]), nn.Sequential(*mods[k:])


@contextlib.contextmanager
def _only_trainable(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    saved = {p: p.requires_grad for p in model.parameters()}
    keep = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


@torch.no_grad()
def _head_inputs(model: MultiExitModel, xb: torch.Tensor, exits: Sequence[int], prefixes: Sequence[nn.Module]):
    """For one uint8 batch: the cached input of every trained head (its prefix applied to the block output)."""
    h = model.normalize(xb)
    out = {}
    for i, block in enumerate(model.blocks[: max(exits) + 1]):
        h = block(h)
        if i in exits:
            out[i] = prefixes[exits.index(i)](h)
    return [out[i] for i in exits]


def _build_cache(model, images, exits, prefixes, batch_size, max_bytes, tick):  # type: ignore[no-untyped-def]
    """Run the frozen backbone once; return float16 per-exit tensors, or None when they would not fit."""
    first = _head_inputs(model, images[:2], exits, prefixes)
    per_image = sum(t[0].numel() for t in first) * 2
    if per_image * len(images) > max_bytes:
        log.info("head-input cache would take %.1f GB > %.1f GB: streaming", per_image * len(images) / 1e9,
                 max_bytes / 1e9)
        return None
    cache = [torch.empty((len(images), *t.shape[1:]), dtype=torch.float16) for t in first]
    for idx in _batches(len(images), batch_size):
        for c, t in zip(cache, _head_inputs(model, images[idx], exits, prefixes)):
            c[idx] = t.to(torch.float16)
        tick()
    log.info("cached head inputs: %.0f MB for %d images x %d exits", per_image * len(images) / 1e6, len(images),
             len(exits))
    return cache


def train_heads(
    model: MultiExitModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    train_last: bool = False,
    seed: int = 0,
    max_cache_bytes: int = 4 << 30,
    num_threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the exit heads on a frozen backbone (eval-mode BN, no augmentation); the last head only if asked.

    Adam (or SGD with Nesterov momentum) with a cosine schedule on the sum of the heads' cross-entropies.
    Returns per-epoch mean training loss of each trained head (``loss_history[epoch][k]``), final training accuracy
    per trained head, which exits were trained, wall time and whether features were cached.
    """
    _check_data(model, x, y)
    _set_threads(num_threads)
    t0 = time.perf_counter()
    exits = list(range(model.num_exits if train_last else model.num_exits - 1))
    if not exits:
        return {"exits": [], "loss_history": [], "train_accuracy": [], "seconds": 0.0, "cached": False}
    splits = [_split_head(model.heads[i]) for i in exits]
    prefixes = [p for p, _ in splits]
    trainable = [nn.Sequential(rest, model.heads[i].classifier) for i, (_, rest) in zip(exits, splits)]
    params = [p for m in trainable for p in m.parameters()]
    images, labels = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    steps, cache_steps = math.ceil(len(x) / batch_size), math.ceil(len(x) / _CACHE_BATCH)
    done, total = 0, cache_steps + steps * epochs

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    model.eval()
    cache = _build_cache(model, images, exits, prefixes, _CACHE_BATCH, max_cache_bytes, tick)
    if cache is None:
        total = steps * epochs
    sample = [c[:5000].float() for c in cache] if cache else _head_inputs(model, images[:1000], exits, prefixes)
    # Linear straight on the cache (rest empty): train it on standardised inputs.
    scalers = [
        _Standardizer(m[1], smp) if len(m[0]) == 0 and smp.ndim == 2 else None for m, smp in zip(trainable, sample)
    ]
    del sample

    def head_inputs(idx: torch.Tensor) -> list[torch.Tensor]:
        raw = [c[idx].float() for c in cache] if cache else _head_inputs(model, images[idx], exits, prefixes)
        return [sc(r) if sc else r for sc, r in zip(scalers, raw)]

    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    with _only_trainable(model, params):
        try:
            history, correct = _fit(trainable, head_inputs, labels, opt, epochs, batch_size, seed, tick)
        finally:
            for sc in scalers:
                if sc:
                    sc.fold()
    model.eval()
    train_acc = (correct / len(x)).tolist() if epochs else []
    log.info("trained %d exit heads in %.0f s, last-epoch loss %s", len(exits), time.perf_counter() - t0,
             [round(v, 3) for v in history[-1]] if history else None)
    return {
        "exits": exits,
        "loss_history": history,
        "train_accuracy": train_acc,
        "seconds": time.perf_counter() - t0,
        "cached": cache is not None,
    }


class _Standardizer:
    """Train a Linear on standardised inputs (so one lr suits every head type), then fold the scaling back into it.

    logits = W'((x - m) / s) + b' = (W'/s) x + (b' - (W'/s) m): exact, so the exported head needs no extra op.
    """

    def __init__(self, linear: nn.Linear, sample: torch.Tensor):
        self.linear = linear
        self.mean = sample.mean(0)
        std = sample.std(0)
        self.std = torch.where(std > 1e-6, std, torch.ones_like(std))  # dead features: leave unscaled
        with torch.no_grad():
            linear.bias += linear.weight @ self.mean
            linear.weight *= self.std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def fold(self) -> None:
        with torch.no_grad():
            self.linear.weight /= self.std
            self.linear.bias -= self.linear.weight @ self.mean


def _fit(trainable, head_inputs, labels, opt, epochs, batch_size, seed, tick):  # type: ignore[no-untyped-def]
    """The head-training loop: every trained head's cross-entropy summed, cosine LR; returns (history, correct)."""
    n = len(labels)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * math.ceil(n / batch_size)))
    gen = torch.Generator().manual_seed(seed)
    history: list[list[float]] = []
    correct = torch.zeros(len(trainable))
    for m in trainable:
        m.train()
    for _ in range(epochs):
        sums, correct = torch.zeros(len(trainable), dtype=torch.float64), torch.zeros(len(trainable))
        for idx in _batches(n, batch_size, gen):
            losses = []
            for k, (m, inp) in enumerate(zip(trainable, head_inputs(idx))):
                logits = m(inp)
                losses.append(F.cross_entropy(logits, labels[idx]))
                correct[k] += (logits.argmax(1) == labels[idx]).sum()
            loss = torch.stack(losses)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            sched.step()
            sums += loss.detach().double() * len(idx)
            tick()
        history.append((sums / n).tolist())
        log.debug("train_heads epoch %d loss %s", len(history), [round(v, 4) for v in history[-1]])
    return history, correct


def _make_optimizer(name: str, params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    raise DataError(f"optimizer={name!r}; valid: adam, sgd")


def finetune_joint(
    model: MultiExitModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float = 0.01,
    batch_size: int = 128,
    exit_weights: Sequence[float] | None = None,
    augment: bool = True,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    max_batches: int | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune the whole network on all exits jointly (SDN/MSDNet style); SGD with momentum, cosine LR.

    The loss is ``sum_i w_i * CE_i / sum_i w_i`` (uniform weights by default). ``augment``: random crop (pad 4) +
    horizontal flip. ``max_batches`` stops early (e.g. to time an epoch). Returns the per-epoch mean loss of each
    exit (``loss_history[epoch][exit]``), batches run, wall time and seconds per batch.
    """
    _check_data(model, x, y)
    _set_threads(num_threads)
    weights = torch.ones(model.num_exits) if exit_weights is None else torch.tensor(exit_weights, dtype=torch.float32)
    if weights.shape != (model.num_exits,) or (weights < 0).any() or weights.sum() <= 0:
        raise DataError(f"exit_weights: got {list(weights.tolist())}, expected {model.num_exits} non-negative numbers")
    weights = weights / weights.sum()
    images, labels = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    steps = math.ceil(len(x) / batch_size)
    total = steps * epochs if max_batches is None else min(steps * epochs, max_batches)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps * epochs))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    history: list[list[float]] = []
    done, t0 = 0, time.perf_counter()
    model.train()
    for _ in range(epochs):
        sums, seen = torch.zeros(model.num_exits, dtype=torch.float64), 0
        for idx in _batches(len(x), batch_size, gen):
            xb = torch.from_numpy(crop_flip(images[idx].numpy(), rng)) if augment else images[idx]
            losses = torch.stack([F.cross_entropy(lg, labels[idx]) for lg in model(model.normalize(xb))])
            opt.zero_grad(set_to_none=True)
            (losses * weights).sum().backward()
            opt.step()
            sched.step()
            sums += losses.detach().double() * len(idx)
            seen += len(idx)
            done += 1
            if progress:
                progress(done, total)
            if done >= total:
                break
        history.append((sums / max(seen, 1)).tolist())
        if done >= total:
            break
    model.eval()
    seconds = time.perf_counter() - t0
    return {"loss_history": history, "batches": done, "seconds": seconds, "seconds_per_batch": seconds / max(done, 1)}
