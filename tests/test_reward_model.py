"""Reward models: the per-prompt Bradley-Terry loss by hand, scoring at the last real token, loading,
normalised scoring through the "rm:" reward spec (with a tokenizer unlike the policy's), and
`policyopt reward` end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

from policyopt.algorithms import grouped_pairwise_loss
from policyopt.cli import main
from policyopt.data.preferences import load_preference_groups, split_groups
from policyopt.models.loading import ModelLoadError
from policyopt.models.reward_model import (
    STATS_FILE,
    encode_for_scoring,
    load_scalar_model,
    scalar_model_from_causal_lm,
    sequence_scores,
)
from policyopt.models.tiny import TinyModelConfig, build_tiny_model, build_tokenizer
from policyopt.recipes.reward_model import RewardModelConfig, run_reward_model
from policyopt.rewards.combine import RewardError, RewardSpec, load_reward_function
from policyopt.runtime.config import config_from_dict
from policyopt.runtime.metrics import read_metrics

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
D = torch.float64


def nll(x):
    return -F.logsigmoid(torch.as_tensor(x, dtype=D))


# ----------------------------------------------------------------------------- the loss


def test_grouped_pairwise_loss_averages_per_prompt_first():
    # prompt 7 has one pair, prompt 3 a ranking of three answers (three pairs)
    chosen = torch.tensor([2.0, 1.0, 1.0, 0.5], dtype=D)
    rejected = torch.tensor([1.0, 0.5, -1.0, -1.0], dtype=D)
    group = torch.tensor([7, 3, 3, 3])
    loss = grouped_pairwise_loss(chosen, rejected, group)
    expected = (nll(1.0) + (nll(0.5) + nll(2.0) + nll(1.5)) / 3) / 2
    torch.testing.assert_close(loss, expected)
    # a plain mean over pairs would let the ranking count three times as much
    assert not torch.isclose(loss, nll(chosen - rejected).mean())


def test_grouped_pairwise_loss_margin_and_centring():
    chosen = torch.tensor([2.0, 0.0], dtype=D)
    rejected = torch.tensor([1.0, 1.0], dtype=D)
    group = torch.tensor([0, 1])
    loss = grouped_pairwise_loss(chosen, rejected, group, margin=torch.tensor([0.5, 0.0], dtype=D), center_coef=0.01)
    expected = ((nll(0.5) + 0.01 * 9.0) + (nll(-1.0) + 0.01 * 1.0)) / 2
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------------------- scoring


def _texts():
    return ["1+2=", "13+25=", [{"role": "user", "content": "7*6="}]], [
        "<answer>3</answer>", "<answer>38</answer> and then some", "<answer>42</answer>"]


def test_scores_are_read_at_the_last_real_token_whatever_the_padding(model, tokenizer):
    reward_model = scalar_model_from_causal_lm(model)
    prompts, completions = _texts()
    ids, mask = encode_for_scoring(tokenizer, prompts, completions, max_length=64)
    assert (ids[mask.bool()] != tokenizer.pad_token_id).all() and (ids[:, 0] != tokenizer.pad_token_id).all()
    batched = sequence_scores(reward_model, ids, mask)
    alone = torch.cat([sequence_scores(reward_model, *encode_for_scoring(tokenizer, [p], [c], 64))
                       for p, c in zip(prompts, completions)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # the same number transformers' own class gives (pad != EOS here, so its pooling finds the same token)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    torch.testing.assert_close(batched, reward_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1))
    # left padding reads the same token too
    left_ids, left_mask = torch.full_like(ids, tokenizer.pad_token_id), torch.zeros_like(mask)
    for i, n in enumerate(mask.sum(1).tolist()):
        left_ids[i, -n:], left_mask[i, -n:] = ids[i, :n], 1
    torch.testing.assert_close(sequence_scores(reward_model, left_ids, left_mask), batched, atol=1e-5, rtol=1e-5)


def test_scores_stay_right_when_pad_is_eos(model, tokenizer):
    """With pad == EOS the transformers class would read the token before EOS; the mask does not."""
    reward_model = scalar_model_from_causal_lm(model)
    prompts, completions = _texts()
    ids, mask = encode_for_scoring(tokenizer, prompts, completions, max_length=64)
    padded_with_eos = ids.masked_fill(mask == 0, tokenizer.eos_token_id)
    torch.testing.assert_close(sequence_scores(reward_model, padded_with_eos, mask), sequence_scores(reward_model, ids, mask))
    reward_model.config.pad_token_id = tokenizer.eos_token_id
    theirs = reward_model(input_ids=padded_with_eos, attention_mask=mask).logits.squeeze(-1)
    assert not torch.allclose(theirs, sequence_scores(reward_model, ids, mask))


def test_long_rows_keep_the_answer(tokenizer):
    ids, mask = encode_for_scoring(tokenizer, ["9" * 100], ["<answer>1</answer>"], max_length=20)
    assert ids.shape == (1, 20) and ids[0, -1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[0]).endswith("<answer>1</answer><|endoftext|>")


def test_loading_a_causal_lm_or_a_reward_model(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "lm")
    fresh = load_scalar_model(str(tmp_path / "lm"), torch.float32, torch.device("cpu"), head_init="zero")
    assert float(fresh.score.weight.detach().abs().sum()) == 0.0
    torch.testing.assert_close(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    trained = scalar_model_from_causal_lm(model, head_init="normal")
    trained.save_pretrained(tmp_path / "rm")
    kept = load_scalar_model(str(tmp_path / "rm"), torch.float32, torch.device("cpu"), head_init="zero")
    torch.testing.assert_close(kept.score.weight, trained.score.weight)  # a trained head is kept
    reset = load_scalar_model(str(tmp_path / "rm"), torch.float32, torch.device("cpu"), head_init="zero",
                              reset_head=True)
    assert float(reset.score.weight.detach().abs().sum()) == 0.0
    two = scalar_model_from_causal_lm(model)
    two.config.num_labels = 2
    two.config.architectures = ["LlamaForSequenceClassification"]
    two.config.save_pretrained(tmp_path / "two")
    with pytest.raises(ModelLoadError, match="2 labels"):
        load_scalar_model(str(tmp_path / "two"), torch.float32, torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_scalar_model(str(tmp_path / "missing"), torch.float32, torch.device("cpu"))


def test_rm_reward_spec_normalises_and_uses_its_own_tokenizer(model, tokenizer, tmp_path):
    # a reward model whose tokenizer was trained on other text: different ids for the same string
    other = build_tokenizer(["lorem ipsum dolor sit amet, consectetur adipiscing elit"] * 20, vocab_size=290)
    assert other("<answer>38</answer>")["input_ids"] != tokenizer("<answer>38</answer>")["input_ids"]
    reward_model = scalar_model_from_causal_lm(
        build_tiny_model(other, TinyModelConfig(**TINY, vocab_size=290), seed=1), head_init="normal")
    reward_model.save_pretrained(tmp_path / "rm")
    other.save_pretrained(tmp_path / "rm")
    (tmp_path / "rm" / STATS_FILE).write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    prompts, completions = _texts()
    scorer = load_reward_function(f"rm:{tmp_path / 'rm'}")
    got = scorer(prompts=prompts, completions=completions, answer=["3", "38", "42"])
    raw = sequence_scores(reward_model, *encode_for_scoring(other, prompts, completions, 256))
    assert got == pytest.approx(((raw - 0.5) / 2.0).tolist(), abs=1e-5)
    spec = RewardSpec(f"rm:{tmp_path / 'rm'}")
    assert spec.name == "rm" and spec.load()[0] == "rm"
    with pytest.raises(RewardError, match="no such directory"):
        load_reward_function(f"rm:{tmp_path / 'nowhere'}")


# ----------------------------------------------------------------------------- end to end


def _preference_file(tmp_path):
    """An easy preference: the answer that says "yes" beats the one that says "no"; pairs and rankings."""
    path = tmp_path / "prefs.jsonl"
    with path.open("w") as f:
        for i in range(120):
            if i % 3:
                f.write(json.dumps({"prompt": f"question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n")
            else:
                f.write(json.dumps({"prompt": f"question {i}?", "answers": [f"yes {i}", f"maybe {i}", f"no {i}"]}) + "\n")
    return path


def test_reward_model_learns_heldout_preferences_and_saves_its_stats(tmp_path):
    cfg = config_from_dict(RewardModelConfig, {
        "output_dir": str(tmp_path / "run"), "epochs": 8, "batch_size": 16, "optim": {"lr": 5e-3, "warmup_steps": 0},
        "eval_every": 10, "tensorboard": False, "model": {"tiny": TINY},
        "data": {"path": str(_preference_file(tmp_path)), "eval_size": 20}})
    summary = run_reward_model(cfg)
    out = tmp_path / "run"
    assert summary["eval_prompts"] == 20 and summary["train_prompts"] == 100
    assert summary["pairwise_accuracy_after"] >= 0.95 > summary["pairwise_accuracy_before"]
    stats = json.loads((out / "final" / STATS_FILE).read_text())
    train, _ = split_groups(load_preference_groups(str(tmp_path / "prefs.jsonl")), 20, seed=0)
    assert stats["num_answers"] == sum(len(g.answers) for g in train) and stats["std"] > 0
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"]
    for key in ("accuracy", "margin", "reward/mean", "grad_norm", "seconds_per_step"):
        assert key in steps[0]
    for name in ("summary.json", "config.yaml", "curves.png", "final/config.json", "final/tokenizer.json"):
        assert (out / name).exists(), name
    # the saved model reloads and its normalised scores prefer the held-out "yes"
    scorer = load_reward_function(f"rm:{out / 'final'}")
    scores = scorer(prompts=["question 500?", "question 500?"], completions=["yes 500", "no 500"])
    assert scores[0] > scores[1]
    # normalised with the stored stats: over the training answers the scores have mean 0 and std 1
    normalised = torch.tensor(scorer(prompts=[g.prompt for g in train for _ in g.answers],
                                     completions=[a for g in train for a in g.answers]))
    assert float(normalised.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(normalised.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_builtin_reward_model_and_cli(tmp_path):
    out = tmp_path / "cli"
    assert main(["reward", "--output-dir", str(out), "epochs=1", "batch_size=16", "tensorboard=false",
                 "data.builtin.num_prompts=32", "data.builtin.eval_prompts=8", "data.task.steps=2",
                 "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
                 "model.tiny.intermediate_size=64"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "reward" and summary["train_prompts"] == 32 and summary["eval_prompts"] == 8
    assert "eval/pairwise_accuracy/correct>wrong" in summary["eval_after"]
    assert (out / "preferences_train.jsonl").exists() and (out / "preferences_eval.jsonl").exists()
    assert main(["reward", "--output-dir", str(out), "head_init=sideways"]) == 2
