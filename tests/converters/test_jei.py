"""JEI-DNN training (converters/jei.py): gate targets, losses, training on real images, checkpoint → bundle policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters.jei import (  # noqa: E402
    ExitCosts,
    Gates,
    cache_exit_inputs,
    exit_costs,
    gate_loss,
    gate_targets,
    head_loss,
    jei_policy,
    pos_weights,
    train_jei,
)
from converters.multiexit import load_checkpoint  # noqa: E402
from edgequee.devices import load_device  # noqa: E402
from edgequee.errors import ConversionError, DataError  # noqa: E402
from edgequee.jei import JeiPolicy  # noqa: E402
from edgequee.policies import Traces  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE_NPZ = REPO / "converters" / "zoo" / "cifar10_sample.npz"
CHECKPOINT = REPO / "converters" / "zoo" / "resnet20_cifar10_exits.pt"
COST = ExitCosts((0.35, 0.68, 1.0), (1.4, 2.72, 4.0), "test", "latency", "fp32", "hand-made", "none")


def test_gate_targets_by_hand() -> None:
    ce = torch.tensor([[2.0, 0.5, 0.1], [0.1, 0.05, 0.0], [3.0, 2.0, 0.2]])
    cost = torch.tensor([0.3, 0.6, 1.0])
    # λ = 1: row 0 → (2.3, 1.1, 1.1): tie, the first wins (1); row 1 → (0.4, 0.65, 1.0): 0; row 2 → (3.3, 2.6, 1.2): 2
    best, t = gate_targets(ce, cost, 1.0)
    assert best.tolist() == [1, 0, 2]
    assert t.tolist() == [[0, 1], [1, 1], [0, 0]]  # t_l = 1[l ≥ l*] for the two gates
    best0, _ = gate_targets(ce, cost, 0.0)  # no cost: the lowest cross-entropy
    assert best0.tolist() == [2, 2, 2]


def test_pos_weights_by_hand() -> None:
    # n = (2, 1) of 6 samples with l* at gates 0, 1 → (6−2)/2 = 2, (6−1)/1 = 5
    assert pos_weights(torch.tensor([0, 0, 1, 2, 2, 2]), 2).tolist() == [2.0, 5.0]
    assert pos_weights(torch.tensor([2, 2, 2]), 2).tolist() == [5.0, 5.0]  # (3 − 0)/0.1 = 30, capped


def test_gate_loss_weighs_positives() -> None:
    logits = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(0.0), torch.tensor(1.0)))
    assert float(gate_loss(logits, t, torch.tensor([3.0, 4.0]))) == pytest.approx((bce + 4 * bce) / 2)


def test_weighted_and_unweighted_head_loss() -> None:
    ce = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    p = torch.tensor([[0.5, 0.0], [0.25, 0.75]])
    weighted = head_loss(ce, p, "weighted")
    assert weighted.item() == pytest.approx((0.5 + 0.0 + 0.75 + 3.0) / 4)
    (grad,) = torch.autograd.grad(weighted, ce)
    assert torch.allclose(grad, p / 4)  # a sample never leaving at exit l teaches head l nothing
    assert float(head_loss(ce, p, "unweighted")) == pytest.approx(2.5)
    # the official code's loss mean(P·CE · ΣCE/ΣP·CE) (ratio not detached) is the unweighted mean, gradient included
    weighted_sum = (p * ce).sum(1, keepdim=True)
    official = (p * ce * (ce.sum(1, keepdim=True) / weighted_sum)).mean()
    (g_official,) = torch.autograd.grad(official, ce)
    (g_unweighted,) = torch.autograd.grad(head_loss(ce, p, "unweighted"), ce)
    assert float(official) == pytest.approx(2.5) and torch.allclose(g_official, g_unweighted)
    with pytest.raises(DataError, match="weighted, unweighted"):
        head_loss(ce, p, "sum")


def test_gates_export_matches_the_device_rule() -> None:
    from edgequee.features import softmax_stats
    from edgequee.jei import gate_outputs

    gates = Gates(2, torch.Generator().manual_seed(0))
    logits = torch.randn(5, 3, 10)
    u = torch.from_numpy(softmax_stats(logits.numpy()[:, :2]).astype(np.float32))
    g = torch.sigmoid(gates(u)).detach().numpy()
    assert np.allclose(gate_outputs(gates.export(), logits.numpy()), g, atol=1e-6)


@pytest.fixture(scope="module")
def sample_npz():  # type: ignore[no-untyped-def]
    with np.load(SAMPLE_NPZ) as z:
        return {k: z[k][:1000] for k in ("x_train", "y_train", "x_test", "y_test")}  # the tests' 1000 test images


@pytest.fixture(scope="module")
def features(sample_npz):  # type: ignore[no-untyped-def]
    return cache_exit_inputs(load_checkpoint(CHECKPOINT), sample_npz["x_test"])


@pytest.mark.slow
def test_train_jei_on_real_images(sample_npz, features) -> None:
    x, y = sample_npz["x_test"], sample_npz["y_test"]
    reports, heads = {}, {}
    for loss in ("weighted", "unweighted"):
        model = load_checkpoint(CHECKPOINT)
        before = model.heads[0].classifier.weight.detach().clone()
        r = train_jei(model, x, y, COST, lam=0.3, loss=loss, epochs=3, phase_batches=5, features=features)
        reports[loss], heads[loss] = r, model.heads[0].classifier.weight.detach().clone()
        assert not torch.equal(before, heads[loss])
        assert torch.equal(load_checkpoint(CHECKPOINT).heads[2].classifier.weight, model.heads[2].classifier.weight)
        assert r["n_val"] == 100 and r["n_train"] == 900 and len(r["history"]) == 3
        policy = JeiPolicy(**r["policy"]["params"], arrays={"gates": np.asarray(r["policy"]["gates"])})
        assert policy.gates.shape == (2, 5) and policy.conformal is not None and policy.threshold == 0.5
        assert policy.trained["lam"] == 0.3 and policy.trained["exit_cost"] == [0.35, 0.68, 1.0]
        # the folded heads of the model, run through torch, reproduce the reported validation accuracy
        val = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:100].numpy()
        with torch.no_grad():
            logits = torch.stack(model(model.normalize(torch.from_numpy(x[val]))), 1).numpy()
        d = policy.exits_for_knob(Traces({"fp32": logits}), 0.5, {"fp32": np.diff(COST.values, prepend=0.0)})
        acc = float((d.logits.argmax(1) == y[val]).mean())
        # (training reads float16 cached features: a borderline sample may flip)
        assert acc == pytest.approx(r["val"]["accuracy"], abs=0.011)
        assert np.abs(np.subtract(r["val"]["exit_histogram"], np.bincount(d.exit, minlength=3))).sum() <= 2
    assert not torch.equal(heads["weighted"], heads["unweighted"])  # same seed, different loss → different heads
    assert reports["weighted"]["history"][0]["head_loss"] < reports["unweighted"]["history"][0]["head_loss"]


def test_train_jei_checks_its_inputs(sample_npz, features) -> None:
    model = load_checkpoint(CHECKPOINT)
    x, y = sample_npz["x_test"], sample_npz["y_test"]
    with pytest.raises(DataError, match="loss="):
        train_jei(model, x, y, COST, loss="sum", features=features)
    with pytest.raises(DataError, match="2 exit costs for 3 exits"):
        train_jei(model, x, y, ExitCosts((0.5, 1.0), (1, 2), "t", "latency", "fp32", "", ""), features=features)


@pytest.mark.slow
def test_exit_costs_from_a_bundle_cost_model(converted) -> None:
    from edgequee.bundle import load_bundle
    from edgequee.cost import CostModel

    model = load_checkpoint(CHECKPOINT)
    c = exit_costs(model, converted.path, "x86-host")
    cm = CostModel.for_bundle(load_bundle(converted.path), "x86-host")
    full = cm.path(["fp32"] * 3).latency_ms
    assert c.values == pytest.approx([cm.path(["fp32"] * (i + 1)).latency_ms / full for i in range(3)])
    assert c.values[-1] == 1.0 and list(c.values) == sorted(c.values)
    assert c.device == load_device("x86-host").name and "estimated" in c.source  # this machine's x86 class
    energy = exit_costs(model, converted.path, "x86-host", objective="energy", precision="int8")
    assert energy.objective == "energy" and energy.values[-1] == 1.0
    from converters._registry import create_model

    with pytest.raises(ConversionError, match="same backbone"):
        exit_costs(create_model("resnet20", exits="every:3"), converted.path, "x86-host")


@pytest.mark.slow
def test_jei_checkpoint_converts_to_a_bundle_with_the_jei_policy(converted, sample, tmp_path) -> None:
    from click.testing import CliRunner

    from converters.jobs import TrainJob, convert_job, run_training
    from edgequee.bundle import load_bundle
    from edgequee.cli import main
    from edgequee.runtime import EdgeRunner

    ckpt = tmp_path / "jei.pt"
    args = ["train", str(CHECKPOINT), "--data", str(SAMPLE_NPZ), "--out", str(ckpt), "--method", "jei",
            "--cost-from", str(converted.path), "--device", "x86-host", "--head-epochs", "1", "--jei-epochs", "1",
            "--lam", "0.2", "--json", str(tmp_path / "train.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "jei gates (λ=0.2, weighted): validation accuracy" in result.output
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["jei"]["warmup_loss_history"] and report["jei"]["cost"]["device"] == load_device("x86-host").name
    policy = jei_policy(ckpt)
    assert policy is not None and policy.trained["device"] == load_device("x86-host").name
    assert jei_policy(CHECKPOINT) is None  # a heads-only checkpoint
    with pytest.raises(ConversionError, match="add it to --precisions"):
        convert_job(str(ckpt), tmp_path / "b", str(SAMPLE_NPZ), precisions=("int8",))
    bundle = convert_job(str(ckpt), tmp_path / "jei.bundle", str(SAMPLE_NPZ), precisions=("fp32",), n_parity=100)
    stored = load_bundle(bundle.path).policy()
    assert stored is not None and stored.name == "jei" and stored.certificate is None
    assert np.array_equal(stored.arrays["gates"], policy.gates) and stored.params == policy.params()
    with pytest.warns(UserWarning, match="no risk certificate"):
        runner = EdgeRunner(bundle.path)
    assert isinstance(runner.policy, JeiPolicy)
    r = runner.classify(sample.x_test[0])
    assert isinstance(r.prediction_set, tuple) and all(0 <= k < 10 for k in r.prediction_set)
    out = CliRunner().invoke(main, ["run", str(bundle.path), str(SAMPLE_NPZ)])
    assert out.exit_code == 0, out.output
    assert " set {" in out.output
    with pytest.raises(DataError, match="--cost-from"):
        run_training(TrainJob(model=str(CHECKPOINT), data=str(SAMPLE_NPZ), out=tmp_path / "x.pt", method="jei"))
