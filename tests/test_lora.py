"""LoRA through peft: the reference is the base with the adapter off, only adapters train, the merged export
matches without touching the trained model, and every recipe trains, saves and resumes an adapter."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from policyopt.cli import main
from policyopt.models.forward import TokenBatch, grouped_logprobs
from policyopt.models.loading import cache_keyword
from policyopt.models.lora import (
    AdapterDisabled,
    LoraConfig,
    apply_lora,
    count_trainable,
    merged_model,
    save_merged,
)
from policyopt.recipes.grpo import GRPOConfig, run_grpo
from policyopt.recipes.ppo import PPOConfig, run_ppo
from policyopt.recipes.reward_model import RewardModelConfig, run_reward_model
from policyopt.recipes.rl import load_actors
from policyopt.recipes.sft import SFTConfig, run_sft
from policyopt.rollout.sampling import SamplingConfig, sample_completions
from policyopt.runtime.config import ConfigError, config_from_dict
from policyopt.runtime.metrics import read_metrics
from policyopt.runtime.run import Run

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
# fp32 logits of the merged model, x (W + s B A)^T, against the adapted one, x W^T + s (x A^T) B^T: the same
# sums in another order, a few float32 ulps per layer on logits of size ~1 (measured: 7e-7)
MERGE_ATOL = 1e-5
TIMING = {"seconds_per_step", "generation_seconds", "tokens_per_second"}


def _trained_adapter(model, seed: int = 1, r: int = 4):
    """``model`` under a LoRA adapter whose B is random (as after training), so the adapter changes the output."""
    wrapped = apply_lora(model, LoraConfig(r=r), seed=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return wrapped


def _batch(tokenizer, group_size: int = 3) -> TokenBatch:
    generator = torch.Generator().manual_seed(0)
    prompts = tokenizer(["What is 2 + 3?", "Compute 7 * 8 please"], padding=True, return_tensors="pt")
    ids = torch.randint(10, 200, (2 * group_size, 5), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0  # answers of different lengths
    mask[4, 1:] = 0
    return TokenBatch(prompts["input_ids"], prompts["attention_mask"], ids * mask, mask, group_size)


def test_reference_is_the_base_bit_for_bit_in_every_forward_layout(model, tokenizer):
    base = copy.deepcopy(model).eval()
    fresh = apply_lora(copy.deepcopy(model), LoraConfig(r=8), seed=0)
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B = 0 at the start: the adapted policy is the base exactly
        assert torch.equal(fresh(input_ids=ids).logits, base(input_ids=ids).logits)

    policy = _trained_adapter(model)
    policy.train()  # the reference runs in eval mode whatever mode the policy is in, and restores it
    reference = AdapterDisabled(policy)
    batch = _batch(tokenizer)
    rows = torch.arange(batch.completion_ids.size(0))
    with torch.no_grad():
        for layout in ("packed", "shared", "padded"):
            want, _ = grouped_logprobs(base, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask, rows, batch.group_size, layout=layout)
            got, _ = grouped_logprobs(reference, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                      batch.completion_mask, rows, batch.group_size, layout=layout)
            adapted, _ = grouped_logprobs(policy, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                          batch.completion_mask, rows, batch.group_size, layout=layout)
            assert torch.equal(got, want), layout
            assert (adapted - want).abs().max() > 1e-3, layout  # the adapter is on for the policy itself
    assert policy.training and all(m.training for m in policy.modules())
    # one set of weights: every tensor the reference reads is the policy's own
    assert {p.data_ptr() for p in reference.parameters()} <= {p.data_ptr() for p in policy.parameters()}
    with pytest.raises(RuntimeError, match="frozen"):
        reference.train()


def test_sampling_with_an_adapter_uses_the_cache_keyword_of_the_base(model, tokenizer, recwarn):
    policy = _trained_adapter(model)
    assert cache_keyword(policy) == cache_keyword(model) == cache_keyword(AdapterDisabled(policy))
    prompts = tokenizer(["What is 2 + 3?", "Compute 7 * 8"], padding=True, return_tensors="pt")
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    with torch.no_grad():
        got = sample_completions(policy, prompts["input_ids"], prompts["attention_mask"], 2, greedy,
                                 tokenizer.eos_token_id, tokenizer.pad_token_id)
        want = sample_completions(merged_model(policy), prompts["input_ids"], prompts["attention_mask"], 2, greedy,
                                  tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert torch.equal(got.completion_ids, want.completion_ids)  # greedy: the merged weights give the same answers
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def test_only_adapter_parameters_train(model):
    policy = apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    hidden, r = TINY["hidden_size"], 4
    assert count_trainable(policy)[0] == 2 * (hidden * r + r * hidden)  # one layer: q and v, A and B each


def test_merged_export_matches_the_adapter_and_leaves_the_trained_model_untouched(model, tokenizer, tmp_path):
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    policy = _trained_adapter(model)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    save_merged(policy, tokenizer, tmp_path / "merged")
    policy.save_pretrained(tmp_path / "adapter")
    after = policy.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    ids = torch.randint(0, 250, (3, 11), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # a plain model: no peft needed
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - adapted).abs().max() < MERGE_ATOL
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)  # the adapter round-trips exactly


def test_config_keys_and_errors():
    cfg = config_from_dict(GRPOConfig, {}, ["model.lora.r=8", "model.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert config_from_dict(GRPOConfig, {}).model.lora.enabled is False
    with pytest.raises(ConfigError, match="model.lora.r must be >= 0"):
        config_from_dict(GRPOConfig, {}, ["model.lora.r=-1"])
    with pytest.raises(ConfigError, match="needs model.lora.r > 0"):
        config_from_dict(GRPOConfig, {}, ["model.lora.quantize=4bit"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            config_from_dict(SFTConfig, {}, ["model.lora.r=8", "model.lora.quantize=4bit", "model.device=cpu"])


@pytest.fixture()
def digit_reward(tmp_path):
    """A reward the untrained tiny model earns now and then (the task's accuracy it never does): a signal."""
    path = tmp_path / "digit_reward.py"
    path.write_text("def starts_with_digit(prompts, completions, **columns):\n"
                    "    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]\n\n\n"
                    "def length(prompts, completions, **columns):\n"
                    "    return [len(c) / 10 for c in completions]\n")
    return f"{path}:starts_with_digit"


def _grpo(tmp_path, reward, **overrides):
    data = {"rewards": [{"function": reward}], "output_dir": str(tmp_path), "steps": 4, "prompts_per_step": 4, "group_size": 4, "beta": 0.04,
            "update_epochs": 2, "num_minibatches": 2, "optim": {"lr": 3e-2, "warmup_steps": 0},
            "save_every": 1, "keep_last": 10, "eval_every": 2, "tensorboard": False,
            "sampling": {"max_new_tokens": 6}, "data": {"eval_size": 8},
            "model": {"tiny": TINY, "lora": {"r": 8}}}
    return config_from_dict(GRPOConfig, {**data, **overrides})


def test_grpo_with_lora_holds_one_copy_moves_the_adapter_and_resumes_exactly(tmp_path, monkeypatch, digit_reward):
    import policyopt.recipes.rl as rl

    def no_copies(model):
        raise AssertionError("a LoRA run must not copy the model for its reference")

    monkeypatch.setattr(rl, "frozen_copy", no_copies)
    config = _grpo(tmp_path / "probe", digit_reward)
    actors = load_actors(Run(config, "grpo", total_steps=config.steps), config)
    assert isinstance(actors.reference, AdapterDisabled) and actors.reference.model is actors.policy
    del actors

    full = tmp_path / "full"
    summary = run_grpo(_grpo(full, digit_reward))
    assert summary["model_dir"] == str(full / "final_merged") and summary["adapter_dir"] == str(full / "final")
    adapter = load_file(str(full / "final" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at 0: every adapter moved
    assert json.loads((full / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (full / "initial").resolve())
    assert not (full / "checkpoints" / "step-000001" / "model.safetensors").exists()  # checkpoints: the adapter

    # a run stopped after step 2 (its later checkpoints and outputs gone) and resumed gives the same run
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("final*", "summary.json", "step-00000[34]"))
    run_grpo(_grpo(resumed, digit_reward, resume="auto"))
    strip = lambda path: [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(path)]  # noqa: E731
    assert strip(resumed / "metrics.jsonl") == strip(full / "metrics.jsonl")
    for name in ("final/adapter_model.safetensors", "final_merged/model.safetensors"):
        got, want = load_file(str(resumed / name)), load_file(str(full / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def test_sft_with_lora_saves_an_adapter_and_a_merged_model(tmp_path):
    cfg = config_from_dict(SFTConfig, {"output_dir": str(tmp_path), "steps": 10, "batch_size": 16, "eval_every": 0,
                                       "tensorboard": False, "max_new_tokens": 4, "rewards": [], "optim": {"lr": 5e-2, "warmup_steps": 0},
                                       "model": {"tiny": TINY, "lora": {"r": 8, "alpha": 16}},
                                       "data": {"num_demonstrations": 64, "eval_size": 16}})
    summary = run_sft(cfg)
    # slower than full fine-tuning (which drops > 1 nat in 40 steps): the random tiny model's embeddings and
    # tied output head stay frozen, so only the adapted layers learn the token distribution
    assert summary["eval_nll_after"] < summary["eval_nll_before"] - 0.1
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "initial")
    adapted = PeftModel.from_pretrained(base, tmp_path / "final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final_merged")
    ids = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() < MERGE_ATOL


def test_reward_model_with_lora_trains_its_head(tmp_path):
    cfg = config_from_dict(RewardModelConfig, {
        "output_dir": str(tmp_path), "epochs": 1, "batch_size": 8, "eval_every": 0, "tensorboard": False,
        "head_init": "zero", "optim": {"lr": 1e-2, "warmup_steps": 0}, "model": {"tiny": TINY, "lora": {"r": 4}},
        "data": {"builtin": {"num_prompts": 24, "eval_prompts": 8}, "heldout_rl_size": 8}})
    run_reward_model(cfg)
    adapter = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    head = [v for k, v in adapter.items() if "score" in k]
    assert head and head[0].abs().max() > 0  # the zero-initialised head moved: it trained, and is in the adapter
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final_merged")
    assert torch.equal(merged.score.weight, head[0])
    assert (tmp_path / "final_merged" / "reward_stats.json").exists()  # usable as rm:final_merged


def test_ppo_with_lora_and_the_shared_value_head(tmp_path, digit_reward):
    tiny = [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    assert main(["ppo", "--output-dir", str(tmp_path / "run"), "model.lora.r=4", *tiny,
                 f"rewards={digit_reward.replace(':starts_with_digit', ':length')}",  # never 0: the critic learns
                 "steps=2", "prompts_per_step=8", "update_epochs=1", "data.eval_size=8", "eval_every=0",
                 "sampling.max_new_tokens=6", "tensorboard=false"]) == 0
    out = tmp_path / "run"
    for name in ("final/adapter_model.safetensors", "final/value_head.safetensors", "final_merged/model.safetensors"):
        assert (out / name).exists(), name
    head = load_file(str(out / "final" / "value_head.safetensors"))
    assert any(v.abs().max() > 0 for v in head.values())  # the zero-initialised value head trained


def test_qlora_4bit_trains_only_adapters_and_exports_a_dequantized_merge(model, tokenizer, tmp_path):
    """Where bitsandbytes is installed (its CPU backend runs 4-bit layers; the recipes still refuse QLoRA off CUDA)."""
    pytest.importorskip("bitsandbytes")
    from policyopt.models.lora import is_quantized, load_quantized_causal_lm

    model.save_pretrained(tmp_path / "base")
    quantized = load_quantized_causal_lm(str(tmp_path / "base"), "4bit", torch.float32, torch.device("cpu"))
    assert is_quantized(quantized)
    policy = _trained_adapter(quantized)
    batch = _batch(tokenizer)
    rows = torch.arange(batch.completion_ids.size(0))
    logp, _ = grouped_logprobs(policy, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                               batch.completion_mask, rows, batch.group_size, layout="packed")
    logp.sum().backward()
    assert all(".lora_" in n for n, p in policy.named_parameters() if p.grad is not None)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    save_merged(policy, tokenizer, tmp_path / "merged")
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain fp32: no quantization_config
    assert not is_quantized(merged)
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 4-bit layers dequantize W then multiply in fp32: the merge's only difference is order
        assert (merged(input_ids=ids).logits - policy(input_ids=ids).logits).abs().max() < MERGE_ATOL


@pytest.mark.slow  # four interpreter starts
def test_lora_grpo_killed_twice_then_resumed_matches_the_uninterrupted_run(tmp_path):
    """tests/test_resume.py's SIGKILL harness on a LoRA run: mid-checkpoint-write, then after the final evaluation."""
    from test_resume import COMMANDS, KILLS, RUN, SITECUSTOMIZE, assert_killed_where_asked, assert_same_metrics, run_cli

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    args = [*[f"model.tiny.{k}={v}" for k, v in TINY.items()], *RUN, *COMMANDS["grpo"], "model.lora.r=8"]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    done = run_cli(hooks, "grpo", reference, args)
    assert done.returncode == 0, done.stderr[-3000:]
    for i, spec in enumerate(KILLS):
        assert_killed_where_asked(run_cli(hooks, "grpo", out, args, kill=spec, resume=i > 0), out, spec)
    resumed = run_cli(hooks, "grpo", out, args, resume=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_metrics(out, reference)
    for name in ("final/adapter_model.safetensors", "final_merged/model.safetensors"):
        got, want = load_file(str(out / name)), load_file(str(reference / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
