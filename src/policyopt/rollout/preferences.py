"""The built-in arithmetic task's preference labeller: answers sampled from a policy, ranked by rule.

Answers come from a policy (sampled with ``sample_completions``) and from the right answer and its
corrupted variants; the accuracy reward decides which are right. The preference data itself
(:class:`PreferenceGroup`, files, splits) and the labeller's settings (:class:`BuiltinPreferenceConfig`)
live in ``policyopt.data.preferences``, which imports neither rollout/ nor rewards/.
"""

from __future__ import annotations

import random

import torch

from ..data.arithmetic import ArithmeticTask, completion_for, make_rows
from ..data.batching import decode_completions, encode_prompts
from ..data.preferences import BuiltinPreferenceConfig, PreferenceGroup
from ..rewards.builtin import accuracy_reward
from .sampling import SamplingConfig, sample_completions

__all__ = ["builtin_preferences", "corrupt_answer", "is_correct", "label_group"]


def is_correct(completion: str, answer: str) -> bool:
    """The labeller's (and the accuracy reward's) notion of a right answer."""
    return accuracy_reward([None], [completion], [answer])[0] == 1.0


def corrupt_answer(answer: str, rng: random.Random) -> str:
    """A wrong answer close to the right one: off by a little, a digit changed, a broken tag, or the
    right answer followed by stray text (which the exact-answer check also rejects)."""
    value = int(answer)
    kind = rng.choice(["offset", "offset", "digit", "tag", "tail"])
    if kind == "offset":
        return completion_for(str(value + rng.choice([-3, -2, -1, 1, 2, 3])))
    if kind == "digit":
        digits = list(answer.lstrip("-"))
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
        changed = ("-" if answer.startswith("-") else "") + "".join(digits)
        return completion_for(str(int(changed)) if int(changed) != value else str(value + 1))
    if kind == "tag":
        return f"<answer>{answer}"  # no closing tag: not a readable answer
    # stray text after the answer that closes a tag again, so the last <answer>...</answer> is not a number
    junk = "".join(rng.choice(["</", "<answer>", "answer>", ">", str(rng.randrange(10))]) for _ in range(rng.randint(0, 2)))
    text = completion_for(answer) + junk + "</answer>"
    return text if not is_correct(text, answer) else completion_for(str(value + 1))  # "<answer>3</answer><answer>3</answer>"


def label_group(prompt: str, truth: str, answers: list[str], noise: float, rng: random.Random) -> PreferenceGroup:
    """Rank ``answers`` to one prompt by rule: correct above wrong, shorter correct above longer correct."""
    group = PreferenceGroup(prompt)
    unique = list(dict.fromkeys(answers))
    correct = {a: is_correct(a, truth) for a in unique}
    for i, a in enumerate(unique):
        for b in unique[i + 1:]:
            if correct[a] != correct[b]:
                better, worse, kind = (a, b, "correct>wrong") if correct[a] else (b, a, "correct>wrong")
            elif correct[a] and len(a) != len(b):
                better, worse, kind = (a, b, "short>long") if len(a) < len(b) else (b, a, "short>long")
            else:
                continue  # no preference between two wrong answers or two equally long right ones
            if noise and rng.random() < noise:
                better, worse = worse, better
            group.add_pair(better, worse, 0.0, kind)
    return group


def builtin_preferences(config: BuiltinPreferenceConfig, task: ArithmeticTask, seed: int, tokenizer=None,
                        policy=None, exclude: set[str] | None = None, device: torch.device | str = "cpu",
                        batch_prompts: int = 128) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """(training groups, noise-free held-out groups) for the arithmetic task.

    Prompts are fresh problems, none in ``exclude`` (pass the RL held-out prompts so the reward model
    never sees them). Answers come from ``policy`` (sampled at ``config.temperature``) and from the
    right answer and its corrupted variants.
    """
    config.validate()
    total = config.num_prompts + config.eval_prompts
    rows = make_rows(total, task, seed=seed + 3_000_017, exclude=exclude)
    rng = random.Random(seed)
    sampled: list[list[str]] = [[] for _ in rows]
    if policy is not None and config.answers_per_prompt > 0:
        sampling = SamplingConfig(temperature=config.temperature, max_new_tokens=config.max_new_tokens)
        generator = torch.Generator(device=device).manual_seed(seed)
        for start in range(0, len(rows), batch_prompts):
            chunk = rows[start:start + batch_prompts]
            ids, mask, _ = encode_prompts(tokenizer, [r["prompt"] for r in chunk], 256, device)
            rollout = sample_completions(policy, ids, mask, config.answers_per_prompt, sampling,
                                         tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
            texts = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
            K = config.answers_per_prompt
            for j in range(len(chunk)):
                sampled[start + j] = texts[j * K:(j + 1) * K]
    train, held_out = [], []
    for i, row in enumerate(rows):
        answers = list(sampled[i]) + [completion_for(row["answer"])]
        if config.include_long_correct:
            answers.append(completion_for(f" {row['answer']} "))
        answers += [corrupt_answer(row["answer"], rng) for _ in range(config.num_corrupted)]
        is_eval = i >= config.num_prompts
        group = label_group(row["prompt"], row["answer"], answers, 0.0 if is_eval else config.label_noise, rng)
        if group.pairs:
            (held_out if is_eval else train).append(group)
    return train, held_out
