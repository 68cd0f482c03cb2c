"""The policy registry and the threshold policy's decisions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgequee import policies
from edgequee.errors import EdgequeeError
from edgequee.policies import EXIT, ExitState, ThresholdPolicy, create_policy, list_policies, register_policy


def _state(*probs: float, exit_index: int = 0) -> ExitState:
    with np.errstate(divide="ignore"):
        logits = np.log(np.asarray(probs, np.float32))
    return ExitState(exit_index, logits, ["fp32"])


def test_exit_state_softmax() -> None:
    state = _state(0.7, 0.2, 0.1)
    np.testing.assert_allclose(state.probs(), [0.7, 0.2, 0.1], rtol=1e-6)
    assert state.max_prob() == pytest.approx(0.7, rel=1e-6)


@pytest.mark.parametrize("name", list_policies())
def test_every_registered_policy_follows_the_interface(name: str) -> None:
    policy = create_policy(name)
    assert policy.name == name
    assert policy.precisions and set(policy.precisions) <= {"fp32", "fp16", "int8"}
    assert policy.start() in policy.precisions
    for probs in ((1.0, 0.0), (0.5, 0.5)):
        assert policy.decide(_state(*probs)) in (EXIT, *policy.precisions)


def test_unknown_policy_lists_the_valid_names() -> None:
    with pytest.raises(EdgequeeError, match=r"unknown policy 'no-such-gate'; choose one of: " + ", ".join(list_policies())):
        create_policy("no-such-gate")


def test_register_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policies, "_POLICIES", dict(policies._POLICIES))

    @register_policy("always-exit")
    class AlwaysExit:
        name = "always-exit"
        precisions = ("int8",)

        def start(self) -> str:
            return "int8"

        def decide(self, state: ExitState) -> str:
            return EXIT

    assert "always-exit" in list_policies() and list_policies() == sorted(list_policies())
    assert isinstance(create_policy("always-exit"), AlwaysExit)


def test_threshold_policy_decisions() -> None:
    policy = create_policy("threshold", precision="int8", threshold=0.8)
    assert isinstance(policy, ThresholdPolicy)
    assert policy.precisions == ("int8",) and policy.start() == "int8"
    assert policy.decide(_state(0.9, 0.1)) == EXIT
    assert policy.decide(_state(0.81, 0.19)) == EXIT
    assert policy.decide(_state(0.79, 0.21)) == "int8"
    assert policy.decide(_state(0.6, 0.3, 0.1)) == "int8"
    assert policy.decide(_state(0.5, 0.5, exit_index=3)) == "int8"


def test_threshold_policy_default_never_exits() -> None:
    policy = ThresholdPolicy()
    assert policy.threshold == math.inf and policy.start() == "fp32"
    assert policy.decide(_state(1.0, 0.0)) == "fp32"
    assert ThresholdPolicy("fp16", 0.0).decide(_state(0.1, 0.1)) == EXIT
