"""Held-out evaluation: greedy answers to fixed prompts, scored by the run's reward functions, and
optionally pass@k from answers sampled at an evaluation temperature."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .algorithms import pass_at_k
from .data.batching import decode_completions, encode_prompts
from .rewards.combine import score_completions
from .rollout.sampling import SamplingConfig, sample_completions


@dataclass
class PassAtK:
    """How ``evaluate`` estimates pass@k: ``samples`` answers per prompt at ``temperature``.

    An answer counts as correct when the reward logged as ``reward`` (a RewardSpec name) scores it
    >= ``threshold``: with the built-in 0/1 accuracy and threshold 1, exactly the right answer.
    Sampling reads a generator seeded with ``seed`` at every evaluation, so each evaluation draws
    from the same random stream (comparable across steps) and training's own stream is untouched.
    """

    k: int
    samples: int
    temperature: float = 1.0
    reward: str = "accuracy"
    threshold: float = 1.0
    seed: int = 0


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], reward_functions, max_new_tokens: int,
             max_prompt_tokens: int, device, batch_size: int = 256, on_error: str = "raise",
             autocast: torch.dtype | None = None, pass_k: PassAtK | None = None) -> dict:
    """Mean reward of greedy completions, per function and in total: ``eval/<name>`` and ``eval/reward``.

    With the built-in accuracy reward, ``eval/accuracy`` is the fraction of exactly right answers.
    With ``pass_k``, also ``eval/pass@<k>`` (the unbiased estimator, ``algorithms.pass_at_k``, averaged
    over prompts) and ``eval/pass@1_sampled`` (the share of correct sampled answers) from
    ``pass_k.samples`` answers per prompt. Forward passes run under ``autocast`` (None: the weights' dtype).
    """
    if not rows:
        return {}
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    per_function, totals, lengths = [], [], []
    names: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        scores, rollout = _answer_and_score(model, tokenizer, chunk, reward_functions, greedy, 1, max_prompt_tokens,
                                            device, on_error, autocast, None)
        names = scores.names
        per_function.append(scores.per_function)
        totals.append(scores.total)
        lengths.append(rollout.lengths.float())
    per_function_t = torch.cat(per_function)
    result = {"eval/reward": float(torch.cat(totals).nanmean())}
    for j, name in enumerate(names):
        result[f"eval/{name}"] = float(per_function_t[:, j].nanmean())
    result["eval/completion_length"] = float(torch.cat(lengths).mean())
    if pass_k is not None and pass_k.k > 0:
        result.update(_pass_at_k(model, tokenizer, rows, reward_functions, max_new_tokens, max_prompt_tokens, device,
                                 batch_size, on_error, autocast, pass_k))
    return result


def _answer_and_score(model, tokenizer, chunk, reward_functions, sampling, n, max_prompt_tokens, device, on_error,
                      autocast, generator):
    """(scores [len(chunk) * n], rollout): n answers per row, rows' answers contiguous."""
    prompts = [r["prompt"] for r in chunk]
    ids, mask, _ = encode_prompts(tokenizer, prompts, max_prompt_tokens, device)
    rollout = sample_completions(model, ids, mask, n, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                 generator, autocast=autocast)
    texts = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
    columns = {k: [r.get(k) for r in chunk for _ in range(n)] for k in chunk[0] if k != "prompt"}
    scores = score_completions(reward_functions, [p for p in prompts for _ in range(n)], texts, columns,
                               on_error=on_error)
    return scores, rollout


def _pass_at_k(model, tokenizer, rows, reward_functions, max_new_tokens, max_prompt_tokens, device, batch_size,
               on_error, autocast, spec: PassAtK) -> dict:
    """eval/pass@k and eval/pass@1_sampled over the prompts whose samples the deciding reward scored."""
    sampling = SamplingConfig(temperature=spec.temperature, max_new_tokens=max_new_tokens)
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    per_prompt = max(1, batch_size // spec.samples)  # about batch_size sequences per generation call
    correct_counts = []
    for start in range(0, len(rows), per_prompt):
        chunk = rows[start: start + per_prompt]
        scores, _ = _answer_and_score(model, tokenizer, chunk, reward_functions, sampling, spec.samples,
                                      max_prompt_tokens, device, on_error, autocast, generator)
        if spec.reward not in scores.names:
            raise ValueError(f"eval_pass_reward={spec.reward!r} is not one of the run's rewards "
                             f"({', '.join(scores.names)})")
        deciding = scores.per_function[:, scores.names.index(spec.reward)].view(len(chunk), spec.samples)
        scored = ~deciding.isnan().any(dim=1)  # a prompt the reward does not apply to (None) is left out
        correct_counts.append((deciding[scored] >= spec.threshold).sum(dim=1))
    counts = torch.cat(correct_counts)
    if counts.numel() == 0:
        return {f"eval/pass@{spec.k}": float("nan"), "eval/pass@1_sampled": float("nan")}
    return {f"eval/pass@{spec.k}": float(pass_at_k(spec.samples, counts, spec.k).mean()),
            "eval/pass@1_sampled": float(counts.double().mean() / spec.samples)}
