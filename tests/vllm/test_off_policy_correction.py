"""The truncated importance weights and mismatch metrics (rollout/engine.py), against hand-computed values.
Pure torch: this file runs in the main suite too (no vLLM needed)."""

import math

import pytest
import torch

from policyopt.rollout.engine import LocalEngine, RolloutConfig, importance_weights, mismatch_metrics

# two answers; the second has one padded token. delta = log pi_old - log pi_engine per token
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
ENGINE = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -2.4, 0.0]])  # delta = [[0.5, -1, 0], [0, 1.2, pad]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_token_weights_are_the_ratio_truncated_at_the_cap():
    w = importance_weights(OLD, ENGINE, MASK, "token", cap=2.0)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, 2.0, 0.0]])  # e^1.2 = 3.32 -> 2
    assert torch.allclose(w, expected, atol=1e-6)  # float32 exp: ~1e-7 relative
    assert not w.requires_grad


def test_sequence_weights_are_the_product_over_the_answer_truncated():
    w = importance_weights(OLD, ENGINE, MASK, "sequence", cap=2.0)
    first, second = math.exp(0.5 - 1.0 + 0.0), min(math.exp(1.2), 2.0)
    assert torch.allclose(w, torch.tensor([[first] * 3, [second, second, 0.0]]), atol=1e-6)
    assert importance_weights(OLD, ENGINE, MASK, "off", cap=2.0) is None


def test_mismatch_metrics_by_hand():
    w = importance_weights(OLD, ENGINE, MASK, "token", cap=2.0)
    m = mismatch_metrics(OLD, ENGINE, MASK, w, cap=2.0)
    deltas = [0.5, -1.0, 0.0, 0.0, 1.2]
    ratios = [math.exp(d) for d in deltas]
    assert m["mismatch/abs_logp_diff"] == pytest.approx(sum(abs(d) for d in deltas) / 5)
    assert m["mismatch/max_abs_diff"] == pytest.approx(1.2)
    assert m["mismatch/kl"] == pytest.approx(sum(r - 1 - d for r, d in zip(ratios, deltas)) / 5)
    assert m["mismatch/ess"] == pytest.approx(sum(ratios) ** 2 / (5 * sum(r * r for r in ratios)))
    assert m["mismatch/is_truncated_fraction"] == pytest.approx(1 / 5)
    same = mismatch_metrics(OLD, OLD, MASK, None, cap=2.0)  # an engine that matches the trainer exactly
    assert same["mismatch/kl"] == 0 and same["mismatch/ess"] == pytest.approx(1.0)


def test_the_local_engine_is_the_default_and_reports_no_logprobs():
    assert RolloutConfig().engine == "local" and RolloutConfig().is_correction == "token"
    assert LocalEngine.returns_logprobs is False
    with pytest.raises(ValueError, match="is_cap"):
        RolloutConfig(is_cap=0.5).validate()
