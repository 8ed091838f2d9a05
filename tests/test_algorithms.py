"""Hand-computed checks of policyopt.algorithms (pure math)."""

import math

import pytest
import torch

from policyopt.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    Registry,
    aggregate_loss,
    bradley_terry_loss,
    cispo_loss,
    clipped_surrogate,
    clipped_value_loss,
    gae_advantages,
    group_advantages,
    gspo_loss,
    gspo_token_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    gather_logprobs,
    overlong_penalty,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_entropy,
    whiten,
    zero_std_group_fraction,
)
from policyopt.algorithms.aggregation import seq_mean_token_mean, seq_sum_constant, token_mean

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, atol=1e-9, rtol=1e-9):
    torch.testing.assert_close(a, t(b) if not isinstance(b, torch.Tensor) else b, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- group advantages


def test_group_advantages_bessel_std_two_groups():
    # group 0: [1,2,3]  mean 2, unbiased var = (1+0+1)/2 = 1    -> std 1
    # group 1: [0,4,8]  mean 4, unbiased var = (16+0+16)/2 = 16 -> std 4
    # (population std would be sqrt(2/3) and sqrt(32/3): different numbers)
    r = t([1.0, 2.0, 3.0, 0.0, 4.0, 8.0])
    close(group_advantages(r, 3, eps=0.0), [-1.0, 0.0, 1.0, -1.0, 0.0, 1.0])
    # default eps = 1e-4 is added to std
    close(
        group_advantages(r, 3),
        [-1 / 1.0001, 0.0, 1 / 1.0001, -4 / 4.0001, 0.0, 4 / 4.0001],
    )


def test_group_advantages_group_size_two():
    # [0,1]: mean .5, unbiased std = sqrt((.25+.25)/1) = sqrt(.5) -> +-0.5/sqrt(.5) = +-sqrt(.5)
    r = t([0.0, 1.0, 1.0, 0.0])
    s = math.sqrt(0.5)
    close(group_advantages(r, 2, eps=0.0), [-s, s, s, -s])


def test_group_advantages_no_scale():
    r = t([1.0, 2.0, 3.0, 0.0, 4.0, 8.0])
    close(group_advantages(r, 3, scale=False), [-1.0, 0.0, 1.0, -4.0, 0.0, 4.0])


def test_group_advantages_all_equal_group_is_exact_zero():
    # 0.1 is not exactly representable: a naive (r - mean)/(std + eps) gives ~1e-13 noise
    r = t([0.1, 0.1, 0.1, 0.0, 1.0, 2.0])
    adv = group_advantages(r, 3)
    assert torch.equal(adv[:3], torch.zeros(3, dtype=D))
    close(adv[3:], [-1 / 1.0001, 0.0, 1 / 1.0001])
    r32 = torch.full((4,), 0.7, dtype=torch.float32)
    assert torch.equal(group_advantages(r32, 4), torch.zeros(4))
    assert torch.equal(group_advantages(r32, 4, scale=False), torch.zeros(4))


def test_group_advantages_nan_excluded_and_zero():
    # group 0: valid [1, 3] -> mean 2, unbiased std sqrt((1+1)/1) = sqrt(2)
    # group 1: only one valid value -> all zero; group 2: all NaN -> all zero
    nan = float("nan")
    r = t([1.0, nan, 3.0, nan, 5.0, nan, nan, nan, nan])
    adv = group_advantages(r, 3, eps=0.0)
    assert not torch.isnan(adv).any()
    s2 = math.sqrt(2.0)
    close(adv, [-1 / s2, 0.0, 1 / s2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # valid values all equal -> zeros
    adv2 = group_advantages(t([4.0, nan, 4.0, 4.0]), 4)
    assert torch.equal(adv2, torch.zeros(4, dtype=D))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match=r"at least 2 answers per prompt.*group_size=1"):
        group_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError) as exc:
        group_advantages(t([1.0, 2.0, 3.0, 4.0, 5.0]), 2)
    assert "5" in str(exc.value) and "group_size=2" in str(exc.value)


def test_zero_std_group_fraction():
    nan = float("nan")
    # groups: [1,1,1] zero; [1,2,3] not; [5,nan,5] zero; [nan,nan,7] (<2 valid) zero -> 3/4
    r = t([1, 1, 1, 1, 2, 3, 5, nan, 5, nan, nan, 7])
    assert zero_std_group_fraction(r, 3) == pytest.approx(0.75)
    assert zero_std_group_fraction(t([0.0, 1.0, 2.0, 2.0]), 2) == pytest.approx(0.5)
    assert zero_std_group_fraction(t([0.0, 1.0, 2.0, 3.0]), 2) == 0.0
    with pytest.raises(ValueError):
        zero_std_group_fraction(t([0.0, 1.0, 2.0]), 2)


# ----------------------------------------------------------------------------- RLOO / REINFORCE++


def test_rloo_leave_one_out_by_hand():
    # group [1, 2, 6]: 1 - (2+6)/2 = -3;  2 - (1+6)/2 = -1.5;  6 - (1+2)/2 = 4.5
    # group [0, 1]-like pair inside a group of 3 is below; here group 2 = [3, 3, 3] -> exactly 0
    r = t([1.0, 2.0, 6.0, 0.1, 0.1, 0.1])
    adv = rloo_advantages(r, 3)
    close(adv, [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    assert torch.equal(adv[3:], torch.zeros(3, dtype=D))
    # G = 2: each answer against the other one
    close(rloo_advantages(t([0.0, 1.0, 5.0, 2.0]), 2), [-1.0, 1.0, 3.0, -3.0])


def test_rloo_ignores_scale_and_eps():
    r = t([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])
    base = rloo_advantages(r, 3)
    for scale, eps in ((True, 1e-4), (False, 1e-4), (True, 0.5), (False, 0.0)):
        assert torch.equal(rloo_advantages(r, 3, scale=scale, eps=eps), base)


def test_rloo_nan_rewards_are_left_out_of_the_baseline():
    nan = float("nan")
    # group 0: valid [4, 0, 2] (n=3): 4 - (0+2)/2 = 3; 0 - (4+2)/2 = -3; 2 - (4+0)/2 = 0; NaN -> 0
    # group 1: one valid reward -> no other answer -> 0; group 2: all NaN -> 0
    r = t([4.0, nan, 0.0, 2.0, nan, 5.0, nan, nan, nan, nan, nan, nan])
    adv = rloo_advantages(r, 4)
    assert not torch.isnan(adv).any()
    close(adv, [3.0, 0.0, -3.0, 0.0] + [0.0] * 8)


def test_rloo_is_dr_grpo_times_g_over_g_minus_one():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(24, generator=g, dtype=D)
    for G in (2, 3, 4, 8):
        close(rloo_advantages(r, G), group_advantages(r, G, scale=False) * G / (G - 1), atol=1e-12, rtol=1e-12)


def test_rloo_errors():
    with pytest.raises(ValueError, match=r"RLOO needs at least 2 answers per prompt.*group_size=1"):
        rloo_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="group_size=2"):
        rloo_advantages(t([1.0, 2.0, 3.0]), 2)


def test_reinforce_pp_normalises_over_the_whole_batch():
    # [0, 1, 2, 5]: mean 2, deviations [-2, -1, 0, 3], unbiased var (4+1+0+9)/3 = 14/3
    r = t([0.0, 1.0, 2.0, 5.0])
    s = math.sqrt(14.0 / 3.0)
    close(reinforce_pp_advantages(r, 2, eps=0.0), [-2 / s, -1 / s, 0.0, 3 / s])
    close(reinforce_pp_advantages(r, 2), [-2 / (s + 1e-4), -1 / (s + 1e-4), 0.0, 3 / (s + 1e-4)])
    # no group baseline: the grouping does not matter (group_size 1 is fine)
    close(reinforce_pp_advantages(r, 1, eps=0.0), reinforce_pp_advantages(r, 4, eps=0.0))
    # scale=False: only the batch mean is subtracted
    close(reinforce_pp_advantages(r, 2, scale=False), [-2.0, -1.0, 0.0, 3.0])


def test_reinforce_pp_nan_and_equal_rewards():
    nan = float("nan")
    # valid [1, 3]: mean 2, unbiased std sqrt(2)
    s2 = math.sqrt(2.0)
    close(reinforce_pp_advantages(t([1.0, nan, 3.0, nan]), 2, eps=0.0), [-1 / s2, 0.0, 1 / s2, 0.0])
    assert torch.equal(reinforce_pp_advantages(t([0.1, 0.1, nan, 0.1]), 2), torch.zeros(4, dtype=D))
    assert torch.equal(reinforce_pp_advantages(t([nan, 7.0]), 1), torch.zeros(2, dtype=D))
    # integer rewards become float32
    out = reinforce_pp_advantages(torch.tensor([0, 1, 1, 0]), 2)
    assert out.dtype == torch.float32


def test_reinforce_pp_baseline_group_mean_then_batch_std():
    # groups [0,1], [2,6], [3,3]: group means .5, 4, 3 -> x = [-.5, .5, -2, 2, 0, 0]
    # batch: mean 0, unbiased var (.25+.25+4+4+0+0)/5 = 1.7 (the all-equal group's zeros count)
    r = t([0.0, 1.0, 2.0, 6.0, 3.0, 3.0])
    s = math.sqrt(1.7)
    adv = reinforce_pp_baseline_advantages(r, 2, eps=0.0)
    close(adv, [-0.5 / s, 0.5 / s, -2 / s, 2 / s, 0.0, 0.0])
    assert torch.equal(adv[4:], torch.zeros(2, dtype=D))
    close(reinforce_pp_baseline_advantages(r, 2), [x / (s + 1e-4) for x in (-0.5, 0.5, -2.0, 2.0, 0.0, 0.0)])
    # GRPO scales each group by its own std instead: both groups give +-1/sqrt(2)
    close(group_advantages(r, 2, eps=0.0)[:4], [-(0.5 ** 0.5), 0.5 ** 0.5, -(0.5 ** 0.5), 0.5 ** 0.5])
    # scale=False: the group-centred rewards, i.e. Dr. GRPO's advantage
    close(reinforce_pp_baseline_advantages(r, 2, scale=False), group_advantages(r, 2, scale=False))


def test_reinforce_pp_baseline_nan_rewards():
    nan = float("nan")
    # group 0: one valid reward (0) -> x = 0, still a valid sample of the batch; group 1: x = [-1, 1]
    # batch over [0, -1, 1]: mean 0, unbiased var (0+1+1)/2 = 1 -> [0, 0, -1, 1]
    adv = reinforce_pp_baseline_advantages(t([0.0, nan, 2.0, 4.0]), 2, eps=0.0)
    close(adv, [0.0, 0.0, -1.0, 1.0])
    # every group without spread: all exactly 0
    assert torch.equal(reinforce_pp_baseline_advantages(t([1.0, 1.0, nan, 2.0]), 2), torch.zeros(4, dtype=D))
    with pytest.raises(ValueError, match="REINFORCE\\+\\+-baseline needs at least 2 answers per prompt"):
        reinforce_pp_baseline_advantages(t([1.0, 2.0]), 1)


@pytest.mark.parametrize("key", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_every_advantage_estimator_takes_the_common_signature(key):
    nan = float("nan")
    r = t([1.0, nan, 3.0, 0.0, 4.0, 8.0])
    adv = ADVANTAGE_ESTIMATORS.get_fn(key)(r, 3, scale=True, eps=1e-4)
    assert adv.shape == (6,) and adv.dtype == D
    assert adv[1] == 0 and not torch.isnan(adv).any()
    assert torch.equal(ADVANTAGE_ESTIMATORS.get_fn(key)(t([2.0] * 6), 3, scale=False, eps=0.0),
                       torch.zeros(6, dtype=D))


# ----------------------------------------------------------------------------- whiten


def test_whiten_unmasked():
    # mean 2.5, unbiased var (2.25+.25+.25+2.25)/3 = 5/3, sqrt = 1.2909944487
    out = whiten(t([1.0, 2.0, 3.0, 4.0]))
    close(out, [-1.5 / 1.2909944487358056, -0.5 / 1.2909944487358056,
                0.5 / 1.2909944487358056, 1.5 / 1.2909944487358056], atol=1e-7, rtol=1e-7)


def test_whiten_masked_and_shift_mean():
    # valid elements 1, 3, 5: mean 3, unbiased var (4+0+4)/2 = 4 -> std 2
    v = t([[1.0, 3.0, 100.0], [5.0, -50.0, float("nan")]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(whiten(v, m), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], atol=1e-7, rtol=1e-7)
    close(whiten(v, m, shift_mean=False), [[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]], atol=1e-7, rtol=1e-7)


# ----------------------------------------------------------------------------- GAE


def test_gae_two_rows_with_padding():
    gamma, lam = 0.9, 0.8  # gamma*lam = 0.72
    rewards = t([[0.0, 0.0, 1.0], [0.2, 1.0, 5.0]])
    values = t([[0.5, 0.6, 0.7], [0.1, 0.4, 9.0]])  # row 1 pos 2 is padding garbage
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    # row 0: d2 = 1 - .7 = .3            A2 = .3
    #        d1 = .9*.7 - .6 = .03       A1 = .03 + .72*.3   = .246
    #        d0 = .9*.6 - .5 = .04       A0 = .04 + .72*.246 = .21712
    # row 1: d1 = 1 + 0 - .4 = .6        A1 = .6   (V_2 = 0 after last valid token)
    #        d0 = .2 + .9*.4 - .1 = .46  A0 = .46 + .72*.6   = .892
    close(adv, [[0.21712, 0.246, 0.3], [0.892, 0.6, 0.0]], atol=1e-12, rtol=0)
    close(ret, [[0.71712, 0.846, 1.0], [0.992, 1.0, 0.0]], atol=1e-12, rtol=0)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = t([[1.0, 2.0, 3.0, 4.0]])
    values = t([[0.5, -1.0, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    # returns = reward-to-go over valid tokens: [6, 5, 3, 0]
    close(ret, [[6.0, 5.0, 3.0, 0.0]])
    close(adv, [[5.5, 6.0, 1.0, 0.0]])


# ----------------------------------------------------------------------------- KL


def test_kl_point_values():
    logp = t([math.log(0.5), 0.0, -1.0])
    ref = t([math.log(0.25), 0.0, 0.0])
    # log_ratio = ref - logp = [-ln2, 0, 1]
    ln2 = 0.6931471805599453
    close(kl_k1(logp, ref), [ln2, 0.0, -1.0])
    close(kl_k2(logp, ref), [0.5 * ln2 * ln2, 0.0, 0.5])
    close(kl_k3(logp, ref), [0.5 + ln2 - 1.0, 0.0, 2.718281828459045 - 1.0 - 1.0])


def test_kl_k3_nonnegative_and_clamped():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(10_000, generator=g) * 5
    ref = torch.randn(10_000, generator=g) * 5
    assert (kl_k3(logp, ref) >= 0).all()
    # huge log ratio is clamped to 20: exp(20) - 20 - 1, finite, with finite gradient
    lp = t([0.0, 0.0], dtype=torch.float32).requires_grad_()
    k = kl_k3(lp, t([100.0, -100.0], dtype=torch.float32))
    close(k, t([485165195.4097903 - 21.0, math.exp(-20) + 20.0 - 1.0], dtype=torch.float32), rtol=1e-6, atol=0)
    k.sum().backward()
    assert torch.isfinite(lp.grad).all()


def test_kl_monte_carlo_unbiased():
    p = t([0.5, 0.3, 0.2])  # pi_theta (sampling policy)
    q = t([0.2, 0.3, 0.5])  # pi_ref
    # KL(p||q) = .5 ln(.5/.2) + .3 ln 1 + .2 ln(.2/.5) = (.5 - .2) ln 2.5
    true_kl = 0.3 * math.log(2.5)
    g = torch.Generator().manual_seed(1234)
    y = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = p.log()[y], q.log()[y]
    assert kl_k3(logp, ref).mean().item() == pytest.approx(true_kl, rel=1e-2)
    assert kl_k1(logp, ref).mean().item() == pytest.approx(true_kl, rel=2e-2)
    # k3 with the ratio flipped estimates KL(q||p)-like quantity ~0.355, far from 0.275
    assert kl_k3(ref, logp).mean().item() != pytest.approx(true_kl, rel=1e-1)


# ----------------------------------------------------------------------------- clipped surrogate


def test_clipped_surrogate_four_regimes_and_grads():
    ratios = t([[1.1, 1.5, 0.5], [1.1, 1.5, 0.5]])
    logp = ratios.log().requires_grad_()
    old = torch.zeros(2, 3, dtype=D)
    adv = t([2.0, -1.0])  # [B], broadcast over tokens
    ones = torch.ones(2, 3, dtype=torch.long)
    loss, clipped = clipped_surrogate(logp, old, adv, ones, 0.2, 0.2)
    # A=+2: inside: -min(2.2, 2.2); above: -min(3.0, 1.2*2=2.4); below: -min(1.0, 0.8*2=1.6)
    # A=-1: inside: -min(-1.1,-1.1); above: -min(-1.5, -1.2);   below: -min(-0.5, -0.8)
    close(loss, [[-2.2, -2.4, -1.0], [1.1, 1.5, 0.8]])
    assert clipped.tolist() == [[False, True, False], [False, False, True]]
    loss.sum().backward()
    # d(-ratio*A)/dlogp = -A*ratio where unclipped; 0 where clipped
    close(logp.grad, [[-2.2, 0.0, -1.0], [1.1, 1.5, 0.0]])
    # per-token advantages [B,T] give the same result
    loss2, clipped2 = clipped_surrogate(logp.detach(), old, adv[:, None].expand(2, 3), ones)
    close(loss2, loss.detach())
    assert torch.equal(clipped2, clipped)
    # the mask is accepted for the common signature and ignored: every token is its own ratio
    loss3, clipped3 = clipped_surrogate(logp.detach(), old, adv, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.2, 0.2)
    close(loss3, loss.detach())
    assert torch.equal(clipped3, clipped)


def test_clipped_surrogate_asymmetric_clip_higher():
    ratios = t([[1.25, 1.3], [0.75, 0.85]])
    logp = ratios.log().requires_grad_()
    adv = t([2.0, -1.0])
    loss, clipped = clipped_surrogate(logp, torch.zeros(2, 2, dtype=D), adv, torch.ones(2, 2), eps_low=0.2,
                                      eps_high=0.28)
    # A=2: 1.25 < 1.28 unclipped -> -2.5; 1.3 > 1.28 -> -1.28*2 = -2.56
    # A=-1: 0.75 < 0.8 clipped -> -(0.8*-1) = 0.8; 0.85 inside -> 0.85
    close(loss, [[-2.5, -2.56], [0.8, 0.85]])
    assert clipped.tolist() == [[False, True], [True, False]]
    loss.sum().backward()
    close(logp.grad, [[-2.5, 0.0], [0.0, 0.85]])


def test_clipped_value_loss():
    values = t([1.0, 1.5, 0.5, 1.5]).requires_grad_()
    old = t([1.0, 1.0, 1.0, 1.0])
    ret = t([2.0, 1.0, 0.0, 2.0])
    loss, clipped = clipped_value_loss(values, old, ret, 0.2)
    # 0: (1-2)^2=1, Vc=1 -> 1            -> .5
    # 1: (1.5-1)^2=.25, Vc=1.2 -> .04    -> .125
    # 2: (.5-0)^2=.25, Vc=.8 -> .64      -> .32 (clipped)
    # 3: (1.5-2)^2=.25, Vc=1.2 -> .64    -> .32 (clipped)
    close(loss, [0.5, 0.125, 0.32, 0.32])
    assert clipped.tolist() == [False, False, True, True]
    loss.sum().backward()
    close(values.grad, [-1.0, 0.5, 0.0, 0.0])


# ----------------------------------------------------------------------------- GSPO / GSPO-token / CISPO

# three answers: log-ratios logp - old_logp of their valid tokens, with padding after them
#   row 0: [0.1, 0.3 | pad]       log s = 0.2   -> s = e^0.2  = 1.2214 (above 1.2)
#   row 1: [-0.3, 0.0, 0.0]       log s = -0.1  -> s = e^-0.1 = 0.9048 (inside [0.8, 1.2])
#   row 2: [0.05 | pad, pad]      log s = 0.05  -> s = e^0.05 = 1.0513 (inside)
GS_MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
GS_LOG_RATIO = t([[0.1, 0.3, 0.0], [-0.3, 0.0, 0.0], [0.05, 0.0, 0.0]])
GS_ADV = t([1.0, -1.0, 2.0])


def gspo_inputs(pad_logp=float("nan"), pad_old=123.0):
    """(logp leaf, old_logp): old_logp arbitrary on valid tokens, garbage at padding."""
    old = t([[-1.0, -2.0, pad_old], [-0.5, -1.5, -2.5], [-3.0, pad_old, pad_old]])
    logp = torch.where(GS_MASK.bool(), old + GS_LOG_RATIO, t(pad_logp)).requires_grad_()
    return logp, old


def test_gspo_sequence_ratio_values_clip_and_gradient():
    logp, old = gspo_inputs()
    loss, clipped = gspo_loss(logp, old, GS_ADV, GS_MASK, 0.2, 0.2)
    s0, s1, s2 = math.exp(0.2), math.exp(-0.1), math.exp(0.05)
    # row 0 (A=1):  -min(1.2214, 1.2)         = -1.2     clipped (s > 1.2, A > 0)
    # row 1 (A=-1): -min(-0.9048, -0.9048)    = 0.9048
    # row 2 (A=2):  -min(2 s2, 2 s2)          = -2.1025
    close(loss, [[-1.2, -1.2, 0.0], [s1, s1, s1], [-2 * s2, 0.0, 0.0]])
    assert clipped.tolist() == [[True, True, False], [False, False, False], [False, False, False]]
    assert s0 > 1.2
    # after seq_mean_token_mean it is the paper's (1/G) sum_i -min(s_i A_i, clip(s_i) A_i)
    close(aggregate_loss(loss, GS_MASK, "seq_mean_token_mean"), t((-1.2 + s1 - 2 * s2) / 3))
    loss.sum().backward()
    # d(-s_i A_i)/d logp_it = -A_i s_i / |y_i| per valid token, summed over the |y_i| copies of the loss:
    # row 0 clipped -> 0; row 1: 3 copies * (s1 / 3) = s1 each; row 2: -2 s2; padding 0, not NaN
    close(logp.grad, [[0.0, 0.0, 0.0], [s1, s1, s1], [-2 * s2, 0.0, 0.0]])


def test_gspo_ratio_ignores_padding():
    a, old_a = gspo_inputs(pad_logp=0.0, pad_old=0.0)
    b, old_b = gspo_inputs(pad_logp=float("nan"), pad_old=-1e9)
    for fn in (gspo_loss, gspo_token_loss):
        la, ca = fn(a, old_a, GS_ADV, GS_MASK, 0.2, 0.2)
        lb, cb = fn(b, old_b, GS_ADV, GS_MASK, 0.2, 0.2)
        close(la, lb)
        assert torch.equal(ca, cb)
        assert torch.isfinite(lb).all()
    # the ratio is the mean over the answer's own tokens: row 0 has 2 of them, not 3
    # (averaging over T = 3 would give log s = 0.4 / 3 = 0.133 -> s = 1.143, inside the clip range)
    loss, _ = gspo_loss(a.detach(), old_a, t([1.0, 1.0, 1.0]), GS_MASK, 10.0, 10.0)
    close(loss[:, 0], [-math.exp(0.2), -math.exp(-0.1), -math.exp(0.05)])


def test_gspo_paper_epsilons_are_the_defaults_and_clip_tiny_ratios():
    logp, old = gspo_inputs()
    loss, clipped = gspo_loss(logp.detach(), old, GS_ADV, GS_MASK)
    # eps 3e-4 / 4e-4: row 0: -(1 + 4e-4); row 1 (A<0, s<1-3e-4): -(-1 * (1 - 3e-4)); row 2: -2 (1 + 4e-4)
    close(loss, [[-1.0004, -1.0004, 0.0], [0.9997, 0.9997, 0.9997], [-2.0008, 0.0, 0.0]])
    assert clipped.tolist() == [[True, True, False], [True, True, True], [True, False, False]]


def test_gspo_token_same_value_per_token_gradient():
    logp, old = gspo_inputs()
    logp_t = logp.detach().clone().requires_grad_()
    loss, clipped = gspo_loss(logp, old, GS_ADV, GS_MASK, 0.2, 0.2)
    loss_t, clipped_t = gspo_token_loss(logp_t, old, GS_ADV, GS_MASK, 0.2, 0.2)
    close(loss_t, loss.detach())
    assert torch.equal(clipped_t, clipped)
    s1 = math.exp(-0.1)
    # one token's loss: GSPO spreads its gradient over the answer's valid tokens (s1 / 3 each, since A = -1),
    # GSPO-token puts it on that token alone (A * -s1 -> s1)
    (g,) = torch.autograd.grad(loss[1, 0], logp, retain_graph=True)
    close(g, [[0.0] * 3, [s1 / 3] * 3, [0.0] * 3])
    (g_t,) = torch.autograd.grad(loss_t[1, 0], logp_t, retain_graph=True)
    close(g_t, [[0.0] * 3, [s1, 0.0, 0.0], [0.0] * 3])
    # with one advantage per answer, the two agree after the recipe's seq_mean_token_mean aggregation
    (g_seq,) = torch.autograd.grad(aggregate_loss(loss, GS_MASK, "seq_mean_token_mean"), logp)
    (g_tok,) = torch.autograd.grad(aggregate_loss(loss_t, GS_MASK, "seq_mean_token_mean"), logp_t)
    close(g_tok, g_seq)
    close(g_seq, [[0.0] * 3, [s1 / 9] * 3, [-2 * math.exp(0.05) / 3, 0.0, 0.0]])


def test_gspo_token_per_token_advantages():
    logp, old = gspo_inputs()
    adv = t([[1.0, 1.0, 0.0], [-1.0, 2.0, 0.5], [2.0, float("nan"), 0.0]])  # NaN at padding is dropped
    loss, clipped = gspo_token_loss(logp, old, adv, GS_MASK, 0.2, 0.2)
    s1, s2 = math.exp(-0.1), math.exp(0.05)
    # row 1, token 1 (A = 2): s1 = 0.9048 inside -> -2 s1; token 2 (A = .5): -.5 s1
    close(loss, [[-1.2, -1.2, 0.0], [s1, -2 * s1, -0.5 * s1], [-2 * s2, 0.0, 0.0]])
    loss.sum().backward()
    close(logp.grad, [[0.0] * 3, [s1, -2 * s1, -0.5 * s1], [-2 * s2, 0.0, 0.0]])


def test_gspo_needs_the_mask():
    logp, old = gspo_inputs()
    with pytest.raises(ValueError, match="mask"):
        gspo_loss(logp, old, GS_ADV, None)
    with pytest.raises(ValueError, match="mask"):
        gspo_token_loss(logp, old, GS_ADV, GS_MASK[:, :2])


def test_cispo_clipped_weight_keeps_the_gradient():
    ratios = t([[1.1, 1.5, 0.5], [1.1, 1.5, 0.5]])
    logp = ratios.log().requires_grad_()
    old = torch.zeros(2, 3, dtype=D)
    adv = t([2.0, -1.0])
    loss, clipped = cispo_loss(logp, old, adv, torch.ones(2, 3), 0.2, 0.2)
    # w = sg[clip(r, .8, 1.2)] = [1.1, 1.2, 0.8]; loss = -w A logp
    w = [1.1, 1.2, 0.8]
    lr = [math.log(1.1), math.log(1.5), math.log(0.5)]
    close(loss, [[-wi * 2 * li for wi, li in zip(w, lr)], [wi * li for wi, li in zip(w, lr)]])
    # clipped marks the clipped weights, whatever the sign of A
    assert clipped.tolist() == [[False, True, True], [False, True, True]]
    loss.sum().backward()
    # -w A on every token; PPO-clip gives 0 on [0,1] and [1,2] (test above)
    close(logp.grad, [[-2.2, -2.4, -1.6], [1.1, 1.2, 0.8]])


def test_cispo_gradient_through_the_log_softmax():
    # loss_t = -clip(r_t) A logp_t: d/dz = -clip(r_t) A d logp_t/dz, also on a clipped token
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 2, 5, generator=g, dtype=D).requires_grad_()
    tokens = torch.tensor([[1, 3]])
    logp = torch.log_softmax(z, dim=-1).gather(-1, tokens[..., None])[..., 0]  # [1, 2]
    old = logp.detach() - t([[0.7, -0.05]])  # r = e^0.7 = 2.01 (clipped to 1.28), e^-0.05 = 0.951
    adv = t([1.5])
    loss, clipped = cispo_loss(logp, old, adv, torch.ones(1, 2), 0.2, 0.28)
    assert clipped.tolist() == [[True, False]]
    (grad_z,) = torch.autograd.grad(loss.sum(), z, retain_graph=True)
    (dlogp0,) = torch.autograd.grad(logp[0, 0], z, retain_graph=True)
    (dlogp1,) = torch.autograd.grad(logp[0, 1], z)
    expected = -1.28 * 1.5 * dlogp0 - math.exp(-0.05) * 1.5 * dlogp1
    close(grad_z, expected, atol=1e-12, rtol=1e-12)
    assert grad_z[0, 0].abs().sum() > 0  # the clipped token still learns


def test_cispo_mask_eps_low_and_per_token_advantages():
    nan = float("nan")
    logp = t([[math.log(0.01), nan], [math.log(2.0), 0.0]]).requires_grad_()
    old = t([[0.0, 5.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    adv = t([[1.0, nan], [1.0, -2.0]])
    # eps_low = 1: no lower bound (r = 0.01 keeps its weight); r = 2 clipped to 1.5
    loss, clipped = cispo_loss(logp, old, adv, mask, 1.0, 0.5)
    close(loss, [[-0.01 * math.log(0.01), 0.0], [-1.5 * math.log(2.0), 0.0]])
    assert clipped.tolist() == [[False, False], [True, False]]
    loss.sum().backward()
    close(logp.grad, [[-0.01, 0.0], [-1.5, 2.0]])  # finite and 0 at the padding


@pytest.mark.parametrize("key", ["ppo_clip", "gspo", "gspo_token", "cispo"])
def test_every_policy_loss_takes_the_common_signature_and_is_reinforce_on_policy(key):
    # on-policy (old = logp): every ratio is 1, nothing clips, and after seq_mean_token_mean every loss
    # has REINFORCE's gradient  -(1/B) A_i / |y_i|  on each valid token
    logp, _ = gspo_inputs(pad_logp=0.0)
    fn = POLICY_LOSSES.get_fn(key)
    loss, clipped = fn(logp, logp.detach(), GS_ADV, GS_MASK, 0.2, 0.28)
    assert loss.shape == clipped.shape == (3, 3) and clipped.dtype == torch.bool
    assert not (clipped & GS_MASK.bool()).any()
    aggregate_loss(loss, GS_MASK, "seq_mean_token_mean").backward()
    close(logp.grad, [[-1 / 6, -1 / 6, 0.0], [1 / 9, 1 / 9, 1 / 9], [-2 / 3, 0.0, 0.0]], atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- DAPO overlong punishment


def test_overlong_penalty_by_hand_at_the_boundaries():
    # max_len 100, cache 20: 0 up to 80, then (80 - L) / 20 down to -1 at 100, -1 beyond
    lengths = torch.tensor([0, 50, 80, 81, 90, 99, 100, 101, 110])
    out = overlong_penalty(lengths, 100, 20)
    assert out.dtype == torch.float32
    close(out.double(), [0.0, 0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0], atol=1e-7, rtol=0)
    # float lengths keep their dtype; 85 -> -0.25
    close(overlong_penalty(t([85.0, 80.5]), 100, 20), [-0.25, -0.025])
    # cache 0: no linear zone; cache = max_len: linear from 0 tokens
    close(overlong_penalty(torch.tensor([100, 101]), 100, 0).double(), [0.0, -1.0])
    close(overlong_penalty(torch.tensor([0, 25, 100, 101]), 100, 100).double(), [0.0, -0.25, -1.0, -1.0])


def test_overlong_penalty_errors():
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), 10, 11)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), 10, -1)


# ----------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry():
    c, r = t([1.0, 0.0, -100.0]), t([0.0, 0.0, 0.0])
    close(bradley_terry_loss(c, r), [math.log(1 + math.exp(-1)), math.log(2.0), 100.0])
    # scalar margin 1: diff 1-0-1 = 0 -> log 2
    close(bradley_terry_loss(t([1.0]), t([0.0]), 1.0), [math.log(2.0)])
    # per-pair margins: diffs .5 and -1
    close(
        bradley_terry_loss(t([1.0, 1.0]), t([0.0, 0.0]), t([0.5, 2.0])),
        [math.log(1 + math.exp(-0.5)), math.log(1 + math.e)],
    )
    # stable in float32 where sigmoid(-200) underflows to 0: log(1 + e^200) = 200 (+ e^-200)
    out = bradley_terry_loss(t([-200.0], dtype=torch.float32), t([0.0], dtype=torch.float32))
    close(out, t([200.0], dtype=torch.float32))


# ----------------------------------------------------------------------------- entropy / log-probs


def test_token_entropy():
    V = 7
    close(token_entropy(torch.zeros(2, 3, V, dtype=D)), torch.full((2, 3), math.log(V), dtype=D))
    close(token_entropy(torch.full((V,), 1000.0, dtype=D)), t(math.log(V)))  # stable
    # p = [.5, .25, .25]: H = .5 ln 2 + .5 ln 4 = 1.5 ln 2
    close(token_entropy(t([0.5, 0.25, 0.25]).log()), t(1.5 * math.log(2.0)))
    z = t([0.0, 0.0, float("-inf")]).requires_grad_()
    h = token_entropy(z)
    close(h, t(math.log(2.0)))
    h.backward()
    assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------- aggregation


LOSS = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_aggregate_each_mode():
    # row means: 2 and 4 -> 3
    close(aggregate_loss(LOSS, MASK, "seq_mean_token_mean"), t(3.0))
    # (1+2+3+4)/4
    close(aggregate_loss(LOSS, MASK, "token_mean"), t(2.5))
    # 10 / (2 * 3), 10 / (2 * 5)
    close(aggregate_loss(LOSS, MASK, "seq_sum_constant", constant=3), t(10.0 / 6.0))
    close(aggregate_loss(LOSS, MASK, "seq_sum_constant", constant=5.0), t(1.0))
    # an all-masked row counts as a sequence with mean 0: (1.5 + 0) / 2
    close(aggregate_loss(LOSS, torch.tensor([[1, 1, 0], [0, 0, 0]]), "seq_mean_token_mean"), t(0.75))
    # NaN in padding never leaks
    nan_loss = t([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    close(aggregate_loss(nan_loss, t([[1, 1, 0], [1, 0, 1]]), "token_mean"), t(13.0 / 4))
    assert set(LOSS_AGGREGATIONS) == {"seq_mean_token_mean", "token_mean", "seq_sum_constant"}


def test_aggregate_errors():
    with pytest.raises(ValueError, match="seq_mean_token_mean.*token_mean.*seq_sum_constant"):
        aggregate_loss(LOSS, MASK, "mean")
    with pytest.raises(ValueError, match="constant"):
        aggregate_loss(LOSS, MASK, "seq_sum_constant")
    with pytest.raises(ValueError, match="constant"):
        aggregate_loss(LOSS, MASK, "seq_sum_constant", constant=0)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_micro_batches_sum_to_whole_batch(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(4, 5, generator=g, dtype=D)
    lengths = torch.tensor([5, 1, 3, 2])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).long()
    kw = {"constant": 8.0} if mode == "seq_sum_constant" else {}
    whole = aggregate_loss(loss, mask, mode, **kw)
    n_seq, n_tok = 4, mask.sum()
    parts = [
        aggregate_loss(loss[s], mask[s], mode, num_sequences=n_seq, num_tokens=n_tok, **kw)
        for s in (slice(0, 2), slice(2, 4))
    ]
    close(parts[0] + parts[1], whole, atol=1e-12, rtol=1e-12)
    # the float form of num_tokens works too
    parts_f = [
        aggregate_loss(loss[s], mask[s], mode, num_sequences=n_seq, num_tokens=float(n_tok), **kw)
        for s in (slice(0, 2), slice(2, 4))
    ]
    close(parts_f[0] + parts_f[1], whole, atol=1e-12, rtol=1e-12)
    # without the whole-batch counts the micro-batches would NOT sum to the whole (sanity of the test)
    naive = sum(aggregate_loss(loss[s], mask[s], mode, **kw) for s in (slice(0, 2), slice(2, 4)))
    assert not torch.allclose(naive, whole)


def test_masked_mean():
    v = t([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
    m = torch.tensor([[1, 0, 1], [0, 0, 0]])
    close(masked_mean(v, m), t(2.0))
    close(masked_mean(v, m, dim=-1), [2.0, 0.0])
    close(masked_mean(v, torch.tensor([[0, 0, 0], [1, 1, 0]]), dim=0), [4.0, 5.0, 0.0])


@pytest.mark.parametrize("chunk_elements", [7, 1 << 24])  # several chunks (one row each) and a single one
def test_gather_logprobs_values_gradients_and_entropy(monkeypatch, chunk_elements):
    from policyopt.algorithms import logprobs

    monkeypatch.setattr(logprobs, "GATHER_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    logits[3, :2] = float("-inf")  # masked vocabulary entries
    columns = torch.tensor([0, 0, 0, 2, 3, 4, 4])  # column 0 serves three tokens, column 1 none
    tokens = torch.tensor([1, 5, 1, 6, 2, 0, 3])
    weights = torch.randn(len(columns), generator=g, dtype=torch.float64)
    for tau in (1.0, 0.7):
        z = logits.clone().requires_grad_(True)
        logp, entropy = gather_logprobs(z, columns, tokens, temperature=tau, with_entropy=True)
        (logp * weights).sum().backward()
        ref_z = logits.clone().requires_grad_(True)
        ref = torch.log_softmax(ref_z / tau, dim=-1)[columns, tokens]
        (ref * weights).sum().backward()
        close(logp.double(), ref.detach(), atol=1e-6, rtol=1e-6)
        close(z.grad, ref_z.grad, atol=1e-6, rtol=1e-6)
        close(entropy.double(), token_entropy(logits / tau), atol=1e-6, rtol=1e-6)
        assert not entropy.requires_grad
    # bf16 logits: float32 results and a bf16 gradient, computed in float32 chunk by chunk
    lb = torch.randn(4, 9, generator=g).to(torch.bfloat16).requires_grad_(True)
    logp, none = gather_logprobs(lb, torch.tensor([1, 3]), torch.tensor([2, 8]))
    assert none is None and logp.dtype == torch.float32 and logp.requires_grad
    logp.sum().backward()
    assert lb.grad.dtype == torch.bfloat16
    ref = torch.log_softmax(lb.detach().float(), dim=-1)[torch.tensor([1, 3]), torch.tensor([2, 8])]
    close(logp, ref, atol=1e-6, rtol=1e-6)
    # temperature 0 (greedy sampling) scores under the untempered distribution
    close(gather_logprobs(lb.detach(), torch.tensor([1]), torch.tensor([2]), temperature=0.0)[0], ref[:1],
          atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- registries

# every key each registry must hold, and the function it names; a new key is added here too
REGISTERED = {
    "advantage estimator": (ADVANTAGE_ESTIMATORS, {"grpo": group_advantages, "rloo": rloo_advantages,
                                                   "reinforce_pp": reinforce_pp_advantages,
                                                   "reinforce_pp_baseline": reinforce_pp_baseline_advantages}),
    "KL estimator": (KL_ESTIMATORS, {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}),
    "policy loss": (POLICY_LOSSES, {"ppo_clip": clipped_surrogate, "gspo": gspo_loss,
                                    "gspo_token": gspo_token_loss, "cispo": cispo_loss}),
    "loss aggregation": (LOSS_AGGREGATIONS, {"seq_mean_token_mean": seq_mean_token_mean,
                                             "token_mean": token_mean, "seq_sum_constant": seq_sum_constant}),
}
ENTRIES = [(kind, key, fn) for kind, (_, table) in REGISTERED.items() for key, fn in table.items()]


@pytest.mark.parametrize("kind", REGISTERED)
def test_registry_holds_exactly_the_expected_keys(kind):
    registry, table = REGISTERED[kind]
    assert registry.kind == kind
    assert dict(registry) == table


@pytest.mark.parametrize("kind, key, fn", ENTRIES, ids=[f"{kind}:{key}" for kind, key, _ in ENTRIES])
def test_each_key_resolves_to_its_function_with_the_equation_documented(kind, key, fn):
    registry, _ = REGISTERED[kind]
    assert registry.get_fn(key) is fn
    # the equation lives in the docstring
    assert " = " in (fn.__doc__ or ""), f"{fn.__name__} ({kind} {key!r}) has no equation in its docstring"


@pytest.mark.parametrize("kind", REGISTERED)
def test_an_unknown_key_names_the_valid_keys(kind):
    registry, table = REGISTERED[kind]
    with pytest.raises(ValueError) as err:
        registry.get_fn("no_such_key")
    message = str(err.value)
    assert kind in message and "no_such_key" in message
    for key in table:
        assert key in message


def test_registering_a_name_twice_raises_and_keeps_the_first():
    registry = Registry("widget")

    @registry.register("a")
    def first():
        pass

    def second():
        pass

    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        registry.register("a")(second)
    assert registry.get_fn("a") is first
    # the shipped registries refuse a second function under a taken key, too
    with pytest.raises(ValueError, match="registered twice"):
        LOSS_AGGREGATIONS.register("token_mean")(second)
    assert LOSS_AGGREGATIONS["token_mean"] is token_mean


def test_aggregate_loss_dispatches_through_the_registry():
    seen = {}

    @LOSS_AGGREGATIONS.register("test_seq_max")
    def seq_max(masked, mask, *, num_sequences, num_tokens, constant):
        """Largest token loss of each answer, averaged:  L = sum_i max_t m_it l_it / num_sequences"""
        seen.update(masked=masked, mask=mask, num_sequences=num_sequences, num_tokens=num_tokens)
        return masked.amax(dim=-1).sum() / num_sequences

    try:
        loss = t([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
        mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
        # row maxima over valid tokens: 2 and 6 -> (2 + 6) / 2; padding arrives as 0, the mask as bool
        close(aggregate_loss(loss, mask, "test_seq_max"), t(4.0))
        close(seen["masked"], [[1.0, 2.0, 0.0], [4.0, 0.0, 6.0]])
        assert seen["mask"].dtype == torch.bool and seen["num_sequences"] == 2 and int(seen["num_tokens"]) == 4
        close(aggregate_loss(loss, mask, "test_seq_max", num_sequences=4), t(2.0))
    finally:
        del LOSS_AGGREGATIONS["test_seq_max"]
    with pytest.raises(ValueError, match="unknown loss aggregation 'test_seq_max'"):
        aggregate_loss(loss, mask, "test_seq_max")
