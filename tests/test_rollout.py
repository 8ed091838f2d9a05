import torch

from policyopt.data.batching import decode_completions, encode_prompts
from policyopt.models.forward import completion_logprobs
from policyopt.rollout.sampling import SamplingConfig, filter_logits, sample_categorical, sample_completions

PROMPTS = ["12+7=", "3*4=", "99-1=", "5+5="]


def _sample(model, tokenizer, group_size, sampling, seed=0):
    ids, mask, _ = encode_prompts(tokenizer, PROMPTS, 64)
    gen = torch.Generator().manual_seed(seed)
    return sample_completions(model, ids, mask, group_size, sampling, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, gen)


def test_shapes_masks_and_group_layout(model, tokenizer):
    r = _sample(model, tokenizer, 3, SamplingConfig(temperature=1.0, max_new_tokens=10))
    n = len(PROMPTS) * 3
    assert r.completion_ids.shape[0] == r.completion_mask.shape[0] == n
    assert r.completion_ids.shape[1] <= 10
    # group-contiguous rows: rows 0..2 answer prompt 0
    assert torch.equal(r.prompt_ids[0], r.prompt_ids[2]) and not torch.equal(r.prompt_ids[2], r.prompt_ids[3])
    for row in range(n):
        length = int(r.completion_mask[row].sum())
        assert torch.all(r.completion_mask[row, :length] == 1) and torch.all(r.completion_mask[row, length:] == 0)
        ended = bool(r.finished[row])
        assert ended == (r.completion_ids[row, length - 1].item() == tokenizer.eos_token_id)
        # no EOS before the last kept token
        assert tokenizer.eos_token_id not in r.completion_ids[row, : length - 1].tolist()


def test_sample_logprobs_match_the_training_forward(model, tokenizer):
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=12)
    r = _sample(model, tokenizer, 4, sampling)
    logp, _ = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                  temperature=0.7)
    assert torch.allclose(logp * r.completion_mask, r.sample_logprobs, atol=1e-4)


def test_greedy_matches_transformers_generate(model, tokenizer):
    r = _sample(model, tokenizer, 1, SamplingConfig(temperature=0.0, max_new_tokens=8))
    ids, mask, _ = encode_prompts(tokenizer, PROMPTS, 64)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ref_text = [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in ref]
    assert decode_completions(tokenizer, r.completion_ids, r.completion_mask) == ref_text


def test_finished_rows_are_dropped_without_changing_other_rows(model, tokenizer):
    # Make EOS very likely for one prompt's rows only by sampling each prompt alone vs. together:
    # greedy results per prompt must not depend on which other rows finished early.
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10)
    together = _sample(model, tokenizer, 2, greedy)
    texts = decode_completions(tokenizer, together.completion_ids, together.completion_mask)
    for i, prompt in enumerate(PROMPTS):
        ids, mask, _ = encode_prompts(tokenizer, [prompt], 64)
        alone = sample_completions(model, ids, mask, 1, greedy, tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert decode_completions(tokenizer, alone.completion_ids, alone.completion_mask)[0] == texts[2 * i]


def test_seeded_sampling_is_reproducible(model, tokenizer):
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=8)
    a = _sample(model, tokenizer, 2, sampling, seed=3)
    b = _sample(model, tokenizer, 2, sampling, seed=3)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_sample_categorical_matches_the_distribution_and_never_draws_zero_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = 100_000
    counts = torch.zeros_like(probs)
    for _ in range(20):
        tokens = sample_categorical(probs.repeat(draws // 20, 1), g).view(-1, 3)  # [draws/20, 3]
        for row in range(3):
            counts[row] += torch.bincount(tokens[:, row], minlength=6).float()
    assert counts[probs == 0].sum() == 0
    freq = counts / draws
    # binomial standard error at p=0.5 and 1e5 draws is 0.0016; 0.006 is ~4 sigma
    assert torch.allclose(freq, probs, atol=0.006), freq
    # unnormalised rows (top-k/top-p output is renormalised by softmax, but be safe) use the relative mass
    tokens = sample_categorical(torch.tensor([[2.0, 0.0, 6.0]]).repeat(40_000, 1), g)
    assert abs(float((tokens == 2).float().mean()) - 0.75) < 0.01


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_k=2)
    assert torch.isinf(kept[0, 2:]).all() and torch.isfinite(kept[0, :2]).all()
    # nucleus 0.7: 0.5 alone is below 0.7, 0.5+0.3 reaches it, so two tokens stay
    kept = filter_logits(logits, top_p=0.7)
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()
    # the most likely token always survives
    kept = filter_logits(logits, top_p=0.1)
    assert torch.isfinite(kept[0, 0]) and torch.isinf(kept[0, 1:]).all()


def test_skipping_sample_logprobs_changes_nothing_else(model, tokenizer):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    with_lp = _sample(model, tokenizer, 2, sampling, seed=5)
    ids, mask, _ = encode_prompts(tokenizer, PROMPTS, 64)
    without = sample_completions(model, ids, mask, 2, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                 torch.Generator().manual_seed(5), record_logprobs=False)
    assert without.sample_logprobs is None and with_lp.sample_logprobs is not None
    assert torch.equal(with_lp.completion_ids, without.completion_ids)
    assert torch.equal(with_lp.completion_mask, without.completion_mask)
