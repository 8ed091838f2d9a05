"""The GRPO family's pieces: pass@k, zero-spread groups, ratio diagnostics, DAPO's dynamic sampling and
overlong handling, the language reward, and CISPO against PPO-clip through the GRPO loop. Hand-computed
values; short end-to-end runs."""

from __future__ import annotations

import math
import textwrap
from types import SimpleNamespace

import pytest
import torch

from policyopt.algorithms import pass_at_k, policy_log_ratio, zero_spread_groups
from policyopt.models.forward import TokenBatch
from policyopt.recipes import grpo as grpo_module
from policyopt.recipes.grpo import GRPOConfig, rollout_with_signal, run_grpo, trained_token_mask
from policyopt.recipes.rl import ScoredRollout, concat_rollouts, record_ratio_diagnostics, select_groups
from policyopt.rewards.combine import RewardScores, RewardSpec, score_completions
from policyopt.rewards.language import LanguageRewardError, language_reward, language_share
from policyopt.runtime.config import config_from_dict
from policyopt.runtime.metrics import read_metrics
from policyopt.runtime.plots import plot_run

EXACT = 1e-12  # values computed in float64 from exact integer ratios: only the final rounding differs


# --- pass@k -------------------------------------------------------------------------------------------

def test_pass_at_k_by_hand():
    # n = 5, k = 2: c = 1 -> 1 - C(4,2)/C(5,2) = 1 - 6/10; c = 2 -> 1 - C(3,2)/C(5,2) = 1 - 3/10
    # c = 4 -> n - c = 1 < k, every pair holds a correct answer; c = 0 -> 0
    values = pass_at_k(5, torch.tensor([0, 1, 2, 4, 5]), 2)
    assert values.tolist() == pytest.approx([0.0, 0.4, 0.7, 1.0, 1.0], abs=EXACT)
    # k = 1 is the share of correct answers; k = n is "any correct"
    assert pass_at_k(8, [3], 1).tolist() == pytest.approx([3 / 8], abs=EXACT)
    assert pass_at_k(4, [0, 1], 4).tolist() == [0.0, 1.0]
    # n = 10, c = 3, k = 3: 1 - C(7,3)/C(10,3) = 1 - 35/120
    assert float(pass_at_k(10, 3, 3)) == pytest.approx(1 - 35 / 120, abs=EXACT)


def test_pass_at_k_errors():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, [1], 5)
    with pytest.raises(ValueError, match=r"\[0, n=4\]"):
        pass_at_k(4, [5], 2)
    with pytest.raises(ValueError, match="integers"):
        pass_at_k(4, [0.5], 2)


# --- zero-spread groups and ratio diagnostics -------------------------------------------------------

def test_zero_spread_groups():
    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, nan, 1.0, nan, nan, nan, nan, 0.5, nan, 0.7])
    # equal; differ; one valid value; none valid; two valid that differ
    assert zero_spread_groups(rewards, 3).tolist() == [True, False, True, True, False]


def test_policy_log_ratio_token_and_sequence_level_ignores_padding():
    logp = torch.tensor([[-1.0, -2.0, 7.0], [-0.5, -0.5, -0.5]])
    old = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    token = policy_log_ratio("ppo_clip", logp, old, mask)
    assert token.tolist() == [[0.5, -1.0, 0.0], [0.0, 0.5, -0.5]]
    # GSPO: log s_i = mean of the answer's token log-ratios, padding left out: (0.5 - 1) / 2, (0 + 0.5 - 0.5) / 3
    sequence = policy_log_ratio("gspo", logp, old, mask)
    assert sequence.tolist() == [[-0.25, -0.25, 0.0], [0.0, 0.0, 0.0]]


def test_clip_sides_and_ratio_statistics():
    from collections import defaultdict

    from policyopt.algorithms import clipped_surrogate

    ratio = torch.tensor([[0.5, 1.5, 1.0, 2.0]])  # token ratios; the last token is padding
    logp, old = ratio.log(), torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    for advantage, low, high in ((-1.0, 1, 0), (1.0, 0, 1)):
        # A < 0: the 0.5 token is clipped below 1 - 0.2; A > 0: the 1.5 token above 1 + 0.2
        _, clipped = clipped_surrogate(logp, old, torch.tensor([advantage]), mask, 0.2, 0.2)
        sums = defaultdict(float)
        record_ratio_diagnostics(sums, "ppo_clip", logp, old, mask, clipped)
        assert (sums["clip_low"], sums["clip_high"]) == (low, high)
        assert sums["ratio_count"] == 3 and sums["ratio_sum"] == pytest.approx(3.0, abs=1e-6)  # float32 exp/log
        assert (sums["ratio_min"], sums["ratio_max"]) == pytest.approx((0.5, 1.5), abs=1e-6)
    sums = defaultdict(float)
    record_ratio_diagnostics(sums, "gspo", logp, old, mask, torch.zeros(1, 4, dtype=torch.bool))
    # one s_i per answer: (0.5 * 1.5 * 1.0)^(1/3)
    assert sums["ratio_count"] == 1 and sums["ratio_min"] == pytest.approx(0.75 ** (1 / 3), abs=1e-6)


# --- selecting and concatenating rollouts -------------------------------------------------------------

PAD = 9


def _rollout(prompts: list[list[int]], answers: list[list[int]], rewards: list[float], group_size: int,
             finished: list[bool] | None = None) -> ScoredRollout:
    """A ScoredRollout built by hand: prompts left-padded, answers right-padded with PAD."""
    P, T = max(map(len, prompts)), max(map(len, answers))
    prompt_ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([a + [PAD] * (T - len(a)) for a in answers])
    completion_mask = torch.tensor([[1] * len(a) + [0] * (T - len(a)) for a in answers])
    total = torch.tensor(rewards)
    scores = RewardScores(total[:, None].clone(), total, ["r"], 0)
    done = torch.tensor(finished if finished is not None else [True] * len(answers))
    return ScoredRollout(TokenBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, group_size), done,
                         scores, 1, 0.5)


def test_select_and_concat_keep_rows_and_repad():
    a = _rollout([[1, 2], [3]], [[4], [5, 6], [7, 8, 8], [9]], [0.0, 1.0, 2.0, 2.0], 2)
    b = _rollout([[1, 2, 3]], [[4, 4, 4, 4], [5]], [3.0, 4.0], 2)
    kept = select_groups(a, torch.tensor([False, True]))
    assert kept.tokens.prompt_ids.tolist() == [[3]]  # the column only group 0 needed is trimmed
    assert kept.tokens.completion_ids.tolist() == [[7, 8, 8], [9, PAD, PAD]]
    assert kept.scores.total.tolist() == [2.0, 2.0]
    both = concat_rollouts([kept, b], PAD)
    assert both.tokens.prompt_ids.tolist() == [[PAD, PAD, 3], [1, 2, 3]]
    assert both.tokens.prompt_mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert both.tokens.completion_ids.tolist() == [[7, 8, 8, PAD], [9, PAD, PAD, PAD], [4, 4, 4, 4], [5, PAD, PAD, PAD]]
    assert both.lengths.tolist() == [3, 1, 4, 1]
    assert both.scores.total.tolist() == [2.0, 2.0, 3.0, 4.0]
    assert (both.num_truncated, both.generation_seconds) == (2, 1.0)
    assert select_groups(a, torch.tensor([False, False])).tokens.completion_ids.size(0) == 0


# --- dynamic sampling ---------------------------------------------------------------------------------

def _fake_rollouts(monkeypatch, batches: list[list[float]], group_size: int = 2):
    """rollout_and_score returns these rewards in turn, one group per consecutive group_size values;
    the answer's single token is the reward's round and position (so rows can be traced)."""
    calls = iter(batches)

    def fake(actors, config):
        rewards = next(calls)
        n = len(rewards)
        answers = [[100 + len(drawn) * 10 + i] for i in range(n)]
        drawn.append(rewards)
        return _rollout([[1]] * (n // group_size), answers, rewards, group_size)

    drawn: list = []
    monkeypatch.setattr(grpo_module, "rollout_and_score", fake)
    return drawn


def _ds_config(**overrides) -> GRPOConfig:
    values = dict(prompts_per_step=3, group_size=2, dynamic_sampling=True, max_generation_rounds=3,
                  sampling={"max_new_tokens": 4})
    values.update(overrides)
    return config_from_dict(GRPOConfig, values)


ACTORS = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=PAD))


def test_dynamic_sampling_fills_the_batch_with_groups_that_carry_signal(monkeypatch):
    # round 1: groups (1,1) (0,1) (0,0) -> one with signal; round 2: (0,1) (1,0) (1,1) -> two more: full
    drawn = _fake_rollouts(monkeypatch, [[1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 1, 1], [0, 1] * 3])
    trained, sampled = rollout_with_signal(ACTORS, _ds_config())
    assert len(drawn) == 2  # stops once prompts_per_step groups with signal are in hand
    assert trained.tokens.completion_ids.flatten().tolist() == [102, 103, 110, 111, 112, 113]
    assert not zero_spread_groups(trained.scores.total, 2).any()
    assert sampled.scores.total.numel() == 12
    metrics = grpo_module.dynamic_sampling_metrics(trained, sampled, _ds_config())
    assert metrics == {"dynamic_sampling/rounds": 2, "dynamic_sampling/groups_sampled": 6,
                       "dynamic_sampling/groups_dropped": 3, "dynamic_sampling/groups_trained": 3,
                       "dynamic_sampling/share_kept": 0.5}


def test_dynamic_sampling_keeps_the_first_groups_and_stops_at_the_cap(monkeypatch):
    _fake_rollouts(monkeypatch, [[0, 1] * 3 + [1, 0]], group_size=2)  # four groups with signal, three wanted
    trained, _ = rollout_with_signal(ACTORS, _ds_config(prompts_per_step=3))
    assert trained.tokens.completion_ids.flatten().tolist() == [100, 101, 102, 103, 104, 105]
    # the cap: two rounds with one signal group in all -> train on that one group, never on zero spread
    drawn = _fake_rollouts(monkeypatch, [[1, 1, 0, 0, 1, 1], [1, 1, 0, 1, 0, 0], [0, 1] * 3])
    trained, sampled = rollout_with_signal(ACTORS, _ds_config(max_generation_rounds=2))
    assert len(drawn) == 2 and trained.scores.total.tolist() == [0.0, 1.0] and sampled.scores.total.numel() == 12
    # nothing with signal: an empty batch (the step makes no update)
    _fake_rollouts(monkeypatch, [[1, 1] * 3])
    trained, _ = rollout_with_signal(ACTORS, _ds_config(max_generation_rounds=1))
    assert trained.tokens.completion_ids.size(0) == 0


def test_overlong_penalty_joins_the_reward_before_groups_are_judged(monkeypatch):
    # max_new_tokens 4, cache 2: length 4 -> (2 - 4) / 2 = -1, length 3 -> -0.5, length <= 2 -> 0
    calls = iter([_rollout([[1], [1]], [[5, 5, 5, 5], [5], [5, 5, 5], [5, 5]], [1.0, 1.0, 1.0, 1.0], 2)])
    monkeypatch.setattr(grpo_module, "rollout_and_score", lambda *a: next(calls))
    trained, sampled = rollout_with_signal(ACTORS, _ds_config(prompts_per_step=2, overlong_penalty_cache=2,
                                                              max_generation_rounds=1))
    assert sampled.scores.names == ["r", "overlong"]
    assert sampled.scores.per_function[:, 1].tolist() == [-1.0, 0.0, -0.5, 0.0]
    assert sampled.scores.total.tolist() == [0.0, 1.0, 0.5, 1.0]  # equal accuracy, yet both groups now differ
    assert trained.scores.total.numel() == 4


def test_overlong_filter_masks_every_token_of_answers_cut_short():
    scored = _rollout([[1]], [[4, 4], [5, 5, 5]], [0.0, 1.0], 2, finished=[True, False])
    assert trained_token_mask(scored, _ds_config()).tolist() == [[1, 1, 0], [1, 1, 1]]
    assert trained_token_mask(scored, _ds_config(overlong_filter=True)).tolist() == [[1, 1, 0], [0, 0, 0]]


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="overlong_penalty_cache"):
        _ds_config(overlong_penalty_cache=5)
    with pytest.raises(ValueError, match="max_generation_rounds"):
        _ds_config(max_generation_rounds=0)
    with pytest.raises(ValueError, match="eval_pass_k"):
        _ds_config(eval_pass_k=9, eval_samples=8)
    with pytest.raises(ValueError, match="eval_pass_reward='exact'"):
        _ds_config(eval_pass_k=2, eval_pass_reward="exact")


# --- one short run with everything on ---------------------------------------------------------------

def test_dapo_run_with_pass_at_k_logs_every_diagnostic(tmp_path):
    reward = tmp_path / "half.py"
    # half the prompts score the same for every answer (zero spread), the other half by the answer
    reward.write_text(textwrap.dedent("""
        def half(prompts, completions, **columns):
            return [1.0 if len(p) % 2 else float(c[:1].isdigit()) for p, c in zip(prompts, completions)]
    """))
    config = config_from_dict(GRPOConfig, {
        "output_dir": str(tmp_path / "run"), "steps": 3, "prompts_per_step": 4, "group_size": 4, "eval_every": 3,
        "optim": {"lr": 1e-2, "warmup_steps": 0}, "rewards": [{"function": f"{reward}:half"}],
        "sampling": {"max_new_tokens": 4}, "data": {"eval_size": 8}, "num_minibatches": 2, "update_epochs": 2,
        "policy_loss": "gspo", "clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4, "loss_aggregation": "token_mean",
        "dynamic_sampling": True, "max_generation_rounds": 2, "overlong_filter": True, "overlong_penalty_cache": 2,
        "eval_pass_k": 2, "eval_samples": 4, "eval_temperature": 1.0, "eval_pass_reward": "half",
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}}})
    run_grpo(config)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "dynamic_sampling/rounds" in r]
    assert len(steps) == 3
    for r in steps:
        assert 1 <= r["dynamic_sampling/rounds"] <= 2
        assert r["dynamic_sampling/groups_trained"] <= 4
        assert "reward/overlong/mean" in r
        for key in ("clip_fraction_low", "clip_fraction_high", "ratio/mean", "ratio/min", "ratio/max", "entropy"):
            assert key in r, key
        if r["ratio/min"] is not None and not math.isnan(r["ratio/min"]):
            assert r["ratio/min"] <= r["ratio/mean"] <= r["ratio/max"]
    evaluations = [r for r in records if "eval/pass@2" in r]
    assert len(evaluations) >= 2  # before training and at step 3
    for r in evaluations:
        assert 0.0 <= r["eval/pass@1_sampled"] <= r["eval/pass@2"] <= 1.0  # pass@k grows with k
    png = plot_run(tmp_path / "run" / "metrics.jsonl", tmp_path / "curves.png")
    assert png.stat().st_size > 0


# --- the language reward ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, target", [
    ("The answer is 27 because seven plus twenty equals twenty seven.", "en"),
    ("Nous additionnons les nombres, puis nous vérifions le résultat.", "fr"),
    ("Die Antwort ist 27, weil sieben plus zwanzig siebenundzwanzig ergibt.", "de"),
    ("La respuesta es veintisiete porque siete más veinte son veintisiete.", "Spanish"),
    ("先把三和四相加得七，再加九得十六。", "zh"),
])
def test_language_single_language_scores_one_and_zero_for_another_target(text, target):
    assert language_share(text, target) == 1.0
    other = "ja" if target == "zh" else "ru"
    assert language_share(text, other) == 0.0


def test_language_mixed_text_is_the_share_of_words():
    text = "The answer is simple. Die Antwort ist einfach und klar. La réponse est très simple aussi."
    # 4 English words, 6 German, 6 French (each clause in one language)
    assert language_share(text, "en") == pytest.approx(4 / 16, abs=EXACT)
    assert language_share(text, "de") == pytest.approx(6 / 16, abs=EXACT)
    assert language_share(text, "fr") == pytest.approx(6 / 16, abs=EXACT)
    # a switch inside a sentence, at a comma; each Chinese character is one word
    assert language_share("First we add the numbers, puis on vérifie le résultat, and then we stop.",
                          "en") == pytest.approx(9 / 14, abs=EXACT)
    assert language_share("先把三和四相加得七. The answer is sixteen.", "en") == pytest.approx(4 / 13, abs=EXACT)


def test_language_numbers_code_and_markup_are_no_language():
    assert language_share("<answer> 27 </answer>", "fr") == 1.0  # no words at all
    assert language_share("3 + 4 = 7, 7 + 9 = 16", "de") == 1.0
    code = ("Wir rufen die Funktion auf:\n```python\ndef add(x, y):\n    return x + y\nprint(add(3, 4))\n```\n"
            "Das Ergebnis ist sieben.")
    assert language_share(code, "de") == 1.0
    assert language_share("Wir rufen `print(add(3, 4))` auf, x_1 und f(x) ergeben sieben.", "de") == 1.0


def test_language_target_from_the_config_or_the_row():
    fr = RewardSpec("language:fr", name="language").load()
    scores = score_completions([fr], ["p", "p"], ["Bonjour, je suis très content.", "I am very happy today."], {})
    assert scores.total.tolist() == [1.0, 0.0]
    # a row's language column wins over the configured target
    row = RewardSpec("language").load()
    spanish = "Espero que todo vaya muy bien en tu casa."
    scores = score_completions([row], ["p", "p"], [spanish, spanish], {"language": ["es", "en"]})
    assert scores.total.tolist() == [1.0, 0.0]
    with pytest.raises(LanguageRewardError, match="needs a target"):
        language_reward(["p"], ["Hello"])
    with pytest.raises(LanguageRewardError, match="unknown language 'xx'"):
        RewardSpec("language:xx").load()


# --- CISPO against PPO-clip through the GRPO loop -----------------------------------------------------

def _first_update_gradients(tmp_path, monkeypatch, name: str, **settings) -> list[dict]:
    """Every optimizer step's gradients (name -> tensor) in one GRPO step of a tiny model, captured inside
    Run.optimizer_step before clipping and the update: the real rollout, advantages, pi_old pass and loss."""
    from policyopt.runtime.run import Run

    captured: list[dict] = []
    original = Run.optimizer_step

    def capturing(self, model, *args, **kwargs):
        captured.append({k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None})
        return original(self, model, *args, **kwargs)

    reward = tmp_path / "length.py"
    reward.write_text("def length(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n")
    config = config_from_dict(GRPOConfig, {
        "output_dir": str(tmp_path / name), "steps": 1, "prompts_per_step": 4, "group_size": 4, "eval_every": 0,
        "optim": {"lr": 1e-2, "warmup_steps": 0}, "rewards": [{"function": f"{reward}:length"}],
        "sampling": {"max_new_tokens": 6}, "data": {"eval_size": 4}, "loss_aggregation": "token_mean",
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        **settings})
    with monkeypatch.context() as patch:  # undone on return, so a second call wraps the real method
        patch.setattr(Run, "optimizer_step", capturing)
        run_grpo(config)
    return captured


@pytest.mark.parametrize("num_minibatches", [1, 2])
def test_cispo_gradient_equals_ppo_clip_while_the_weights_are_pi_old(tmp_path, monkeypatch, num_minibatches):
    # On-policy (one minibatch, one epoch: pi_old = pi_theta) both losses' gradient is A * grad log pi per
    # token, aggregated by token_mean: CISPO's detached weight w = clip(1) = 1, PPO's ratio exp(0) = 1 with
    # nothing clipped. With 2 minibatches the first update still sees pi_theta = pi_old, but pi_old now comes
    # from the separate no-gradient pass at the sampling temperature (grpo.old_and_reference_logprobs): the
    # ratio is 1 only up to float32 rounding, and both losses scale the gradient by that same ratio.
    ppo = _first_update_gradients(tmp_path, monkeypatch, "ppo", policy_loss="ppo_clip",
                                  num_minibatches=num_minibatches)
    cispo = _first_update_gradients(tmp_path, monkeypatch, "cispo", policy_loss="cispo", clip_ratio_low=1.0,
                                    clip_ratio_high=0.28, num_minibatches=num_minibatches)
    assert len(ppo) == len(cispo) == num_minibatches
    assert ppo[0].keys() == cispo[0].keys() and ppo[0]
    scale = max(float(g.abs().max()) for g in ppo[0].values())
    assert scale > 0  # the length reward gives every group spread, so the gradient is not trivially 0
    # float32 gradients of the same sums in the same order: equal up to a few ulps of the largest entry
    # (and, with 2 minibatches, the ratio's own rounding, ~1e-7 relative)
    for key, expected in ppo[0].items():
        torch.testing.assert_close(cispo[0][key], expected, rtol=1e-5, atol=1e-6 * scale, msg=key)
