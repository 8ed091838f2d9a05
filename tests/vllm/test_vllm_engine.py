"""The vLLM rollout engine against the trainer, for real, on a tiny model (vLLM's CPU build).

Runs in the second environment (scripts/setup_vllm.sh: .venv-vllm); without vLLM the module skips.
The model has head_dim 32: vLLM's CPU attention needs head_dim >= 32.
"""

import pytest

# vllm.entrypoints, not vllm: under pytest this folder (tests/vllm, no __init__) is itself importable as
# a namespace package "vllm" where the real one is not installed
pytest.importorskip("vllm.entrypoints", reason="vLLM is not installed (the vLLM tests run in .venv-vllm: "
                    "scripts/setup_vllm.sh)")

import torch  # noqa: E402

from policyopt.data.arithmetic import ArithmeticTask, make_demonstrations  # noqa: E402
from policyopt.data.batching import encode_prompts  # noqa: E402
from policyopt.models.forward import completion_logprobs  # noqa: E402
from policyopt.models.tiny import TinyModelConfig, build_tiny_model  # noqa: E402
from policyopt.rollout import vllm_engine  # noqa: E402
from policyopt.rollout.engine import RolloutConfig, VLLMOptions, build_engine  # noqa: E402
from policyopt.rollout.sampling import SamplingConfig, sample_completions  # noqa: E402

TINY_32 = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=300)
# fp32 engine vs fp32 trainer: measured 1e-6 apart (other kernels, other summation order); 1e-4 leaves room
# for another CPU's kernels, and is still 100x below the smallest change one training step makes here
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return build_tiny_model(tokenizer, TINY_32, seed=0)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return build_engine(RolloutConfig(engine="vllm", vllm=VLLMOptions(kv_cache_gib=1)), model, tokenizer,
                        torch.device("cpu"), None, max_model_len=96, seed=0)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    rows = make_demonstrations(6, ArithmeticTask(), seed=1)
    ids, mask, _ = encode_prompts(tokenizer, [r["prompt"] for r in rows], 64)
    return ids, mask


def _perturb(model, scale: float, only: str | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))


def test_engine_logprobs_agree_with_the_trainer(engine, model, tokenizer, prompts):
    engine.sync_weights(model)
    ids, mask = prompts
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=12)
    rollout = engine.generate(ids, mask, 4, sampling, torch.Generator().manual_seed(0))
    assert rollout.completion_ids.shape[0] == 24 and rollout.logprobs.shape == rollout.completion_ids.shape
    lengths = rollout.completion_mask.sum(1)
    ends = rollout.completion_ids[torch.arange(24), (lengths - 1).clamp(min=0)]
    assert torch.equal(rollout.finished, ends == tokenizer.eos_token_id)  # finished <=> the last token is EOS
    assert bool((lengths == sampling.max_new_tokens)[~rollout.finished].all())  # the others were cut
    with torch.no_grad():
        trainer, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                         rollout.completion_mask, temperature=sampling.temperature)
    valid = rollout.completion_mask.bool()
    gap = (trainer - rollout.logprobs)[valid].abs().max()
    print(f"max |engine - trainer| log-prob over {int(valid.sum())} tokens: {float(gap):.2e}")
    assert gap < LOGPROB_TOLERANCE
    assert float(rollout.logprobs[valid].max()) <= 0 and bool((rollout.logprobs[~valid] == 0).all())


def test_a_sync_makes_greedy_output_equal_ours_tied_head_included(engine, model, tokenizer, prompts):
    assert "lm_head.weight" in vllm_engine.export_weights(model)  # tied: sent explicitly, vLLM keeps a stale one
    ids, mask = prompts
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    for step, only in enumerate(["embed_tokens", None]):  # the tied embedding/head alone, then every weight
        _perturb(model, 0.5, only, seed=step)
        metrics = engine.sync_weights(model)
        assert metrics["sync_probe_gap"] < metrics["sync_probe_gap_before"]
        ours = sample_completions(model, ids, mask, 1, greedy, tokenizer.eos_token_id, tokenizer.pad_token_id)
        theirs = engine.generate(ids, mask, 1, greedy)
        assert torch.equal(theirs.completion_ids, ours.completion_ids)
        assert torch.equal(theirs.finished, ours.finished)


def test_the_probe_catches_weights_that_never_reach_the_engine(engine, model, monkeypatch):
    engine.sync_weights(model)
    stale = {k: v.clone() for k, v in vllm_engine.export_weights(model).items()}
    monkeypatch.setattr(vllm_engine, "export_weights", lambda _: stale)  # a sync that sends the old weights
    _perturb(model, 0.5, seed=7)
    with pytest.raises(RuntimeError, match="did not follow the trainer"):
        engine.sync_weights(model)
