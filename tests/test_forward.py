"""The optimised training forward gives the same log-probabilities and gradients as the plain one."""

import torch

from policyopt.data.batching import encode_prompts
from policyopt.models.forward import completion_logprobs, grouped_logprobs
from policyopt.models.tiny import TinyModelConfig, build_tiny_model
from policyopt.rollout.sampling import SamplingConfig, sample_completions


def _rollout(tokenizer, model, group_size):
    # prompts of different lengths, so left padding differs per group
    ids, mask, _ = encode_prompts(tokenizer, ["1+2=", "12*34-5=", "7="], 64)
    r = sample_completions(model, ids, mask, group_size, SamplingConfig(temperature=1.0, max_new_tokens=8),
                           tokenizer.eos_token_id, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    # a random model rarely emits EOS: cut answers to ragged lengths so right padding is exercised too
    lengths = torch.tensor([8, 3, 5, 1, 8, 2, 6, 4, 7])[: r.completion_ids.size(0)]
    r.completion_mask = (torch.arange(r.completion_ids.size(1))[None] < lengths[:, None]).long()
    r.completion_ids = r.completion_ids.masked_fill(r.completion_mask == 0, tokenizer.pad_token_id)
    return ids, mask, r


def test_shared_prompt_forward_matches_the_padded_forward(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                        intermediate_size=64), seed=1)
    G = 3
    ids, mask, r = _rollout(tokenizer, model, G)
    rows = torch.tensor([0, 2, 3, 4, 7, 8])  # a subset, as after skipping zero-advantage answers
    weights = torch.randn(len(rows), r.completion_ids.size(1), generator=torch.Generator().manual_seed(0))
    results = {}
    for share in (False, True):
        model.zero_grad()
        logp, entropy = grouped_logprobs(model, ids, mask, r.completion_ids, r.completion_mask, rows, G,
                                         temperature=0.7, with_entropy=True, share_prompt=share)
        valid = r.completion_mask[rows][:, : logp.size(1)]
        (logp * weights[:, : logp.size(1)] * valid).sum().backward()
        results[share] = (logp * valid, entropy * valid, [p.grad.clone() for p in model.parameters()])
    assert torch.allclose(results[True][0], results[False][0], atol=1e-5)
    assert torch.allclose(results[True][1], results[False][1], atol=1e-5)
    for shared, plain in zip(results[True][2], results[False][2]):
        assert torch.allclose(shared, plain, atol=1e-5)
    # and the plain grouped path is the straightforward [prompt | completion] forward
    direct, _ = completion_logprobs(model, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows],
                                    r.completion_mask[rows], temperature=0.7)
    width = results[False][0].size(1)
    assert torch.allclose(direct[:, :width] * r.completion_mask[rows][:, :width], results[False][0], atol=1e-5)
