"""The optimised training forward gives the same log-probabilities and gradients as the plain one."""

import pytest
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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # boolean and additive masks for the packed rows
def test_shared_and_packed_forwards_match_the_padded_forward(tokenizer, attention):
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                        intermediate_size=64), seed=1)
    model.config._attn_implementation = attention
    G = 3
    ids, mask, r = _rollout(tokenizer, model, G)
    rows = torch.tensor([0, 2, 3, 4, 7, 8])  # a subset, as after skipping zero-advantage answers
    weights = torch.randn(len(rows), r.completion_ids.size(1), generator=torch.Generator().manual_seed(0))
    results = {}
    for layout in ("padded", "shared", "packed"):
        model.zero_grad()
        logp, entropy = grouped_logprobs(model, ids, mask, r.completion_ids, r.completion_mask, rows, G,
                                         temperature=0.7, with_entropy=True, layout=layout)
        valid = r.completion_mask[rows][:, : logp.size(1)]
        (logp * weights[:, : logp.size(1)] * valid).sum().backward()
        results[layout] = (logp * valid, entropy * valid, [p.grad.clone() for p in model.parameters()])
    for layout in ("shared", "packed"):
        assert torch.allclose(results[layout][0], results["padded"][0], atol=1e-5), layout
        assert torch.allclose(results[layout][1], results["padded"][1], atol=1e-5), layout
        for fast, plain in zip(results[layout][2], results["padded"][2]):
            assert torch.allclose(fast, plain, atol=1e-5), layout
    # and the plain grouped path is the straightforward [prompt | completion] forward
    direct, _ = completion_logprobs(model, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows],
                                    r.completion_mask[rows], temperature=0.7)
    width = results["padded"][0].size(1)
    assert torch.allclose(direct[:, :width] * r.completion_mask[rows][:, :width], results["padded"][0], atol=1e-5)


def test_auto_layout_packs_short_answers_and_shares_long_ones(tokenizer):
    from policyopt.models.forward import choose_layout

    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2,
                                                        intermediate_size=128), seed=0)
    groups = [b for b in range(4) for _ in range(8)]
    # a long prompt and short answers of uneven length: packing removes the padding and the KV gather
    assert choose_layout(model, "auto", 200, groups, [3, 20, 8, 5] * 8) == "packed"
    # 256-token answers, 8 per prompt: a packed row's dense attention (2056^2 pairs) costs more
    assert choose_layout(model, "auto", 8, groups, [256] * 32) == "shared"
    assert choose_layout(model, "padded", 200, groups, [3] * 32) == "padded"
    model.config._attn_implementation = "flash_attention_2"  # takes no custom mask
    assert choose_layout(model, "auto", 200, groups, [3] * 32) == "shared"
    with pytest.raises(ValueError, match="layout"):
        choose_layout(model, "ragged", 200, groups, [3] * 32)
