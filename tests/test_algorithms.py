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
    clipped_surrogate,
    clipped_value_loss,
    gae_advantages,
    group_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    gather_logprobs,
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
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    # A=+2: inside: -min(2.2, 2.2); above: -min(3.0, 1.2*2=2.4); below: -min(1.0, 0.8*2=1.6)
    # A=-1: inside: -min(-1.1,-1.1); above: -min(-1.5, -1.2);   below: -min(-0.5, -0.8)
    close(loss, [[-2.2, -2.4, -1.0], [1.1, 1.5, 0.8]])
    assert clipped.tolist() == [[False, True, False], [False, False, True]]
    loss.sum().backward()
    # d(-ratio*A)/dlogp = -A*ratio where unclipped; 0 where clipped
    close(logp.grad, [[-2.2, 0.0, -1.0], [1.1, 1.5, 0.0]])
    # per-token advantages [B,T] give the same result
    loss2, clipped2 = clipped_surrogate(logp.detach(), old, adv[:, None].expand(2, 3))
    close(loss2, loss.detach())
    assert torch.equal(clipped2, clipped)


def test_clipped_surrogate_asymmetric_clip_higher():
    ratios = t([[1.25, 1.3], [0.75, 0.85]])
    logp = ratios.log().requires_grad_()
    adv = t([2.0, -1.0])
    loss, clipped = clipped_surrogate(logp, torch.zeros(2, 2, dtype=D), adv, eps_low=0.2, eps_high=0.28)
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
    "advantage estimator": (ADVANTAGE_ESTIMATORS, {"grpo": group_advantages}),
    "KL estimator": (KL_ESTIMATORS, {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}),
    "policy loss": (POLICY_LOSSES, {"ppo_clip": clipped_surrogate}),
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
