"""``policyopt doctor``: a preflight check of a run's config, in well under a minute on a CPU.

    policyopt doctor [grpo|ppo|sft] <the same options and key=value overrides as that command>

It reads the config the run would read, loads what the run would load, and runs each part of one
step on a few prompts, printing one line per finding: OK, INFO, WARN or FATAL. Any FATAL finding
makes the command exit with status 1. For GRPO and PPO it checks:

- data, model and reward functions load; the rewards score a few rows (shown);
- where rows carry a reference (a ``completion``, or an ``answer`` column: as plain text or in the
  built-in ``<answer>X</answer>`` template, whichever scores better), the gold answer gets the highest
  score any sampled answer gets, and more than a corrupted one;
- G answers sampled for a few prompts at the configured sampling settings: mean reward and the share
  of groups whose answers all got the same reward (no learning signal), with advice when nearly all do;
- the sampler's log-probabilities of its own tokens equal the trainer's recomputed ones
  (``rollout.sampling`` against ``models.forward.forward_rows``), and GRPO's loss and gradient do not
  change when the batch is split into micro-batches (``grad_accum_steps``, ``max_tokens_per_forward``);
- the chat template round-trips through the tokenizer;
- the batch geometry the settings imply, and seconds per step and peak memory, extrapolated from
  timing one small rollout and update.

For SFT: data, model and rewards load, what ``eval/nll`` and accuracy will measure, the demonstrations'
lengths against the limits, the chat template, and the cost of a step.

``grpo`` runs the cheapest of these at its start (``preflight``): the rewards on a few rows' gold answers
and the model's greedy answers, with a warning when they cannot work; it changes no state and draws no
random numbers, so a run with it is the run without it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import threading
import time
import types
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..algorithms import zero_std_group_fraction
from ..data.arithmetic import completion_for, make_rows
from ..data.batching import decode_completions, encode_prompts, prompt_length
from ..data.loading import DataError, completion_text, format_prompt, prompt_text
from ..data.sources import PromptSource
from ..models.forward import TokenBatch, forward_rows, split_rows, trim_padding
from ..models.loading import ModelLoadError
from ..models.setup import describe, forward_autocast, load_or_build
from ..rewards.builtin import CLOSE, OPEN
from ..rewards.combine import RewardError, score_completions
from ..rollout import sampling as sampler_module
from ..rollout.sampling import filter_logits, sample_completions

log = logging.getLogger(__name__)

DOCTOR_TARGETS = ("grpo", "ppo", "sft")  # `policyopt doctor NAME ...` reads NAME's config (default grpo)
PROBE_PROMPTS = 8  # prompts the doctor samples G answers for
PREFLIGHT_ROWS = 8  # rows grpo's start-up check scores
SHOWN = 3  # rows or answers printed as examples
ZERO_SPREAD_ADVICE = 0.9  # share of all-equal groups above which the doctor gives advice
PROBE_SEED_OFFSET = 3_000_017  # built-in probe prompts: a seed of their own, apart from eval and training

# Sampler and trainer compute the same log pi(o_t) with different kernels (a KV-cached token-by-token
# decode against one packed or shared-prompt forward), so float rounding differs: in float32 we see
# differences of ~1e-6 nats; 1e-3 leaves room for long answers while any real mismatch (positions,
# padding, dropout, a different temperature) is 0.1 nats or more. In bf16/fp16 (8- or 11-bit
# mantissas, ~0.4% relative error per op) 5e-2.
LOGPROB_TOLERANCE = {"float32": 1e-3, "half": 5e-2}
# Micro-batching sums the same per-answer terms in another order: relative gradient differences
# of ~1e-7 in float32, ~1e-3 in bf16.
GRADIENT_TOLERANCE = {"float32": 1e-4, "half": 2e-2}


# ---------------------------------------------------------------------------------------------- report

@dataclass
class Finding:
    level: str  # OK, INFO, WARN or FATAL
    check: str  # which check (data, rewards, sampling, ...)
    message: str


class Report:
    """The findings, printed as they come (``echo``), one line each."""

    def __init__(self, echo: Callable[[str], None] | None = print):
        self.findings: list[Finding] = []
        self.echo = echo

    def add(self, level: str, check: str, message: str) -> None:
        self.findings.append(Finding(level, check, message))
        if self.echo is not None:
            self.echo(f"{level:<5} {check:<10} {message}")

    def ok(self, check: str, message: str) -> None:
        self.add("OK", check, message)

    def info(self, check: str, message: str) -> None:
        self.add("INFO", check, message)

    def warn(self, check: str, message: str) -> None:
        self.add("WARN", check, message)

    def fatal(self, check: str, message: str) -> None:
        self.add("FATAL", check, message)

    def count(self, level: str) -> int:
        return sum(f.level == level for f in self.findings)

    def levels(self, check: str) -> set[str]:
        return {f.level for f in self.findings if f.check == check}


# ---------------------------------------------------------------------------------------------- entry

def run_doctor(config, recipe: str = "grpo", echo: Callable[[str], None] | None = print) -> dict:
    """Check ``config`` (the config of ``policyopt RECIPE``); returns counts and ``exit_code`` (1: a FATAL)."""
    report = diagnose(config, recipe, echo)
    fatal = report.count("FATAL")
    return {"doctor": recipe, "ok": report.count("OK"), "warn": report.count("WARN"), "fatal": fatal,
            "exit_code": 1 if fatal else 0}


def diagnose(config, recipe: str = "grpo", echo: Callable[[str], None] | None = print) -> Report:
    """Every check for ``recipe``'s ``config``, without touching the caller's random state."""
    report = Report(echo)
    started = time.perf_counter()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        if recipe == "sft":
            _doctor_sft(config, report)
        else:
            _doctor_rl(config, report)
    report.info("doctor", f"{report.count('OK')} OK, {report.count('WARN')} WARN, {report.count('FATAL')} FATAL "
                          f"in {time.perf_counter() - started:.1f} s")
    return report


@dataclass
class Setup:
    """What the checks work on: the run's data, model and reward functions, loaded as the run loads them."""

    rows: list[dict]  # the probe rows: a few training prompts (or built-in problems)
    eval_rows: list[dict]
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    autocast: torch.dtype | None
    rewards: list  # (name, function, weight)
    built_tiny: bool  # no model.name_or_path: a fresh random model, as the run would build

    @property
    def precision(self) -> str:
        weights = next(self.model.parameters()).dtype
        return "float32" if self.autocast is None and weights == torch.float32 else "half"


def _doctor_rl(config, report: Report) -> None:
    for key, value in config.derived().items():
        report.info("geometry", f"{key}: {value}")
    setup = _load_rl(config, report)
    if setup is None:
        return
    _check_columns(config.rewards, setup.rows, report)
    gold = _check_gold(setup, config.sampling.max_new_tokens, report)
    if config.sampling.temperature == 0:
        report.fatal("sampling", "sampling.temperature=0 is greedy: all G answers to a prompt are the same, so "
                                 "every group has zero reward spread and every advantage is 0")
        _check_chat_template(setup, report)
        return
    probe = _check_sampling(setup, config, gold, report)
    if probe is not None:
        _check_gold_is_the_maximum(gold, probe, report)
        _check_logprobs(setup, probe, config, report)
        _check_micro_batches(setup, probe, config, report)
    _check_chat_template(setup, report)
    if probe is not None:
        _estimate_cost(setup, probe, config, report)


# ---------------------------------------------------------------------------------------------- loading

def _load_rl(config, report: Report) -> Setup | None:
    try:
        source = PromptSource(config.data, config.seed)
    except DataError as e:
        report.fatal("data", str(e))
        return None
    columns = sorted({k for r in (source.train_rows or source.eval_rows)[:50] for k in r})
    where = f"{len(source.train_rows)} training rows of {config.data.path}" if not source.builtin else \
        f"built-in arithmetic {config.data.task} (fresh problems every step)"
    report.ok("data", f"{where}; held out: {source.eval_origin}; columns: {', '.join(columns)}")
    if not source.eval_rows:
        report.warn("data", "no held-out rows: accuracy is never measured (data.eval_path or data.eval_size)")
    rewards = _load_rewards(config.rewards, report)
    texts = [prompt_text(r["prompt"]) for r in (source.train_rows or source.eval_rows)]
    loaded = _load_model(config.model, texts, config.seed, report)
    if loaded is None or rewards is None:
        return None
    if getattr(getattr(config, "rollout", None), "engine", "local") != "local":
        report.info("sampling", f"rollout.engine={config.rollout.engine}: the doctor samples with policyopt's own "
                                "sampler; the engine's log-probs are compared to the trainer's during the run")
    return Setup(_probe_rows(source, config), source.eval_rows, *loaded, rewards, config.model.name_or_path is None)


def _load_rewards(specs, report: Report) -> list | None:
    rewards, failed = [], False
    for spec in specs:
        try:
            rewards.append(spec.load())
        except RewardError as e:
            report.fatal("rewards", str(e))
            failed = True
    if failed:
        return None
    if rewards:
        report.ok("rewards", "loaded " + ", ".join(f"{name} (weight {weight:g})" for name, _, weight in rewards))
    return rewards


def _load_model(model_config, texts: list[str], seed: int, report: Report):
    try:
        model, tokenizer, device = load_or_build(model_config, texts, seed, save_dir=None)
    except (ModelLoadError, OSError, ValueError) as e:
        report.fatal("model", f"{model_config.name_or_path}: {e}")
        return None
    autocast = forward_autocast(model_config, model, device)
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    built = "built a fresh tiny model (no model.name_or_path), as the run would: " if model_config.name_or_path \
        is None else f"{model_config.name_or_path}: "
    report.ok("model", f"{built}{describe(model)} on {device}, {weights} weights"
                       + (f", forward passes under {str(autocast).removeprefix('torch.')} autocast" if autocast else ""))
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        report.info("model", "the pad token is the EOS token: answers are masked by length, so this is harmless")
    return model, tokenizer, device, autocast


def _probe_rows(source: PromptSource, config) -> list[dict]:
    if source.builtin:
        return make_rows(PROBE_PROMPTS, config.data.task, seed=config.seed + PROBE_SEED_OFFSET,
                         exclude={r["prompt"] for r in source.eval_rows})
    rows = source.train_rows or source.eval_rows
    return random.Random(config.seed).sample(rows, min(PROBE_PROMPTS, len(rows)))


def _check_columns(specs, rows: list[dict], report: Report) -> None:
    """The built-in accuracy reward reads an ``answer`` column; format and accuracy read <answer> tags."""
    functions = {spec.function for spec in specs}
    if "accuracy" in functions:
        missing = sum(r.get("answer") is None for r in rows)
        if missing == len(rows):
            report.fatal("rewards", f"the built-in accuracy reward reads an 'answer' column, which none of these "
                                    f"rows has (columns: {', '.join(sorted(rows[0]))}): give your own reward, "
                                    "rewards=my_rewards.py:fn")
        elif missing:
            report.warn("rewards", f"{missing} of {len(rows)} rows have no answer: accuracy skips them (None)")


# ---------------------------------------------------------------------------------------------- gold answers

@dataclass
class Gold:
    """The best-scoring rendering of each probe row's reference answer, and a corrupted one."""

    rows: list[int]  # probe rows that have a reference
    texts: list[str]
    labels: list[str]  # how each was rendered: plain, template, completion
    totals: torch.Tensor  # [len(rows)] weighted total
    per_function: torch.Tensor  # [len(rows), F]
    wrong_totals: torch.Tensor  # [len(rows)] a corrupted answer's total (NaN where none could be made)


def _renderings(row: dict) -> list[tuple[str, str]]:
    """The row's gold answer: its completion when it has one (the user's own), else its answer as plain text
    and in the built-in template (the one that scores better is taken)."""
    out = []
    if row.get("completion"):
        return [("completion", completion_text(row["completion"]))]
    if row.get("answer") is not None:
        answer = str(row["answer"])
        out += [("plain", answer), ("template", completion_for(answer))]
    return out


def _corrupt(text: str, answer: str | None) -> str | None:
    """``text`` with its answer replaced by a wrong one (an integer plus one; otherwise reversed or extended)."""
    if not answer or answer not in text:
        return None
    try:
        wrong = str(int(answer) + 1)
    except ValueError:
        wrong = answer[::-1] if answer[::-1] != answer else answer + answer[-1]
    head, _, tail = text.rpartition(answer)
    return head + wrong + tail


def _score(setup: Setup, rows: list[dict], texts: list[str], on_error: str = "raise"):
    columns = {k: [r.get(k) for r in rows] for k in {k for r in rows for k in r} if k != "prompt"}
    return score_completions(setup.rewards, [r["prompt"] for r in rows], texts, columns, on_error=on_error)


def _check_gold(setup: Setup, max_new_tokens: int, report: Report) -> Gold | None:
    flat_rows, flat_texts, owner = [], [], []
    for i, row in enumerate(setup.rows):
        for label, text in _renderings(row):
            flat_rows.append(row)
            flat_texts.append(text)
            owner.append((i, label))
    if not flat_rows:
        report.info("gold", "no 'answer' or 'completion' column: no gold answer to check the rewards against")
        return None
    try:
        scores = _score(setup, flat_rows, flat_texts)
    except RewardError as e:
        report.fatal("rewards", f"on the gold answers: {e}")
        return None
    best: dict[int, int] = {}
    for j, (i, _) in enumerate(owner):
        total = float(scores.total[j]) if not torch.isnan(scores.total[j]) else float("-inf")
        if i not in best or total > float(scores.total[best[i]]):
            best[i] = j
    rows = sorted(best)
    picks = [best[i] for i in rows]
    texts = [flat_texts[j] for j in picks]
    answers = [setup.rows[i].get("answer") for i in rows]
    wrong = [_corrupt(texts[k], None if answers[k] is None else str(answers[k])) for k in range(len(rows))]
    wrong_totals = torch.full((len(rows),), float("nan"))
    have = [k for k, w in enumerate(wrong) if w is not None]
    if have:
        try:
            wrong_totals[have] = _score(setup, [setup.rows[rows[k]] for k in have], [wrong[k] for k in have]).total
        except RewardError as e:
            report.fatal("rewards", f"on a corrupted answer: {e}")
    gold = Gold(rows, texts, [owner[j][1] for j in picks], scores.total[picks], scores.per_function[picks],
                wrong_totals)
    _report_gold(setup, gold, scores.names, max_new_tokens, report)
    return gold


def _report_gold(setup: Setup, gold: Gold, names: list[str], max_new_tokens: int, report: Report) -> None:
    for k in range(min(SHOWN, len(gold.rows))):
        row = setup.rows[gold.rows[k]]
        parts = ", ".join(f"{n}={float(v):g}" for n, v in zip(names, gold.per_function[k]))
        report.info("gold", f"prompt {_short(row['prompt'])} gold {gold.texts[k]!r} ({gold.labels[k]}): {parts}")
    if torch.isnan(gold.totals).all():
        report.warn("gold", "no reward function scores the gold answers (all None): check their columns")
        return
    low, high = float(gold.totals.nanmean()), float(torch.nan_to_num(gold.totals, nan=-1e30).max())
    labels = sorted(set(gold.labels))
    report.ok("gold", f"gold answers ({'/'.join(labels)}) score {low:.3f} on average, at most {high:.3f}")
    if high <= 0:
        report.warn("gold", "every gold answer scores 0 or less: the rewards do not recognise a right answer in "
                            "any form tried (plain, <answer>X</answer>, the row's completion); check what they parse")
    weaker = [k for k in range(len(gold.rows)) if float(gold.totals[k]) < high - 1e-6]
    if weaker and high > 0:
        report.warn("gold", f"{len(weaker)} of {len(gold.rows)} gold answers score less than the best one "
                            f"({float(gold.totals[weaker[0]]):g} < {high:g} for {gold.texts[weaker[0]]!r})")
    beaten = [k for k in range(len(gold.rows)) if float(gold.wrong_totals[k]) > float(gold.totals[k]) + 1e-6]
    tied = [k for k in range(len(gold.rows)) if float(gold.wrong_totals[k]) == float(gold.totals[k])]
    if beaten:
        k = beaten[0]
        report.fatal("gold", f"a wrong answer scores more than the right one ({float(gold.wrong_totals[k]):g} > "
                             f"{float(gold.totals[k]):g} on gold {gold.texts[k]!r}): the reward favours wrong answers")
    elif tied and len(tied) == int((~torch.isnan(gold.wrong_totals)).sum()):
        report.warn("gold", "corrupted answers score exactly what the right ones do: the rewards do not check "
                            "correctness (fine for format or length rewards alone)")
    lengths = [len(setup.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in gold.texts]
    too_long = sum(n > max_new_tokens for n in lengths)
    if too_long:
        say = report.fatal if too_long * 2 > len(lengths) else report.warn
        hint = (" (a model built here has a tokenizer trained on the prompts alone, so the answer's markup takes "
                "many tokens: warm-start with SFT, whose tokenizer learns the demonstrations)" if setup.built_tiny
                else "")
        say("gold", f"{too_long} of {len(lengths)} gold answers need more than sampling.max_new_tokens="
                    f"{max_new_tokens} tokens (up to {max(lengths)} with EOS): the policy cannot write them; raise "
                    f"it{hint}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(prompt_text(value) if isinstance(value, list) else value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


# ---------------------------------------------------------------------------------------------- sampling

@dataclass
class Probe:
    """The doctor's rollout: G answers to each probe prompt, scored, with the sampler's own log-probs."""

    rows: list[dict]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    finished: torch.Tensor
    completions: list[str]
    totals: torch.Tensor  # [N]
    per_function: torch.Tensor  # [N, F]
    names: list[str]
    group_size: int
    sampler_logp: torch.Tensor | None  # [N, T] log pi(o_t) of the full-vocabulary distribution at temperature
    drawn_logp: torch.Tensor | None  # [N, T] log of the probability the token was actually drawn with (top-k/p)
    generation_seconds: float
    timings: dict = field(default_factory=dict)

    def tokens(self) -> TokenBatch:
        return TokenBatch(*trim_padding(self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask),
                          group_size=self.group_size)


class SamplerLogprobs:
    """Records, while active, the sampler's log-probability of every token it picks.

    The sampler keeps none (the trainers recompute them), so this wraps its token picker
    (``rollout.sampling._next_tokens``, which sees each decode step's logits for the rows still in the
    batch) and puts the values back in place afterwards (``assemble``): rows that finished are dropped
    from the batch, in order, so the rows of a smaller batch are the unfinished ones.
    """

    def __init__(self, sampling, eos_token_id: int):
        self.sampling, self.eos = sampling, eos_token_id
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        self._original = sampler_module._next_tokens

        def picking(logits, sampling, *args, **kwargs):
            tokens = self._original(logits, sampling, *args, **kwargs)
            scaled = logits.float() / sampling.temperature
            full = scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
            drawn = filter_logits(scaled, sampling.top_k, sampling.top_p).log_softmax(-1)
            self.records.append((tokens.cpu(), full.cpu(), drawn.gather(-1, tokens[:, None]).squeeze(-1).cpu()))
            return tokens

        sampler_module._next_tokens = picking
        return self

    def __exit__(self, *exc) -> None:
        sampler_module._next_tokens = self._original

    def assemble(self, n: int, completion_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """([N, T] full-vocabulary log-probs, [N, T] drawn log-probs), or None if the records do not line up."""
        width = completion_ids.size(1)
        full, drawn = torch.zeros(n, width), torch.zeros(n, width)
        active, finished = list(range(n)), [False] * n
        for step, (tokens, step_full, step_drawn) in enumerate(self.records):
            if len(tokens) != len(active):
                active = [r for r in active if not finished[r]]
                if len(active) != len(tokens):
                    return None
            for j, row in enumerate(active):
                if finished[row] or step >= width:
                    continue
                if int(tokens[j]) != int(completion_ids[row, step]):
                    return None
                full[row, step], drawn[row, step] = step_full[j], step_drawn[j]
                finished[row] = int(tokens[j]) == self.eos
        return full, drawn


def _check_sampling(setup: Setup, config, gold: Gold | None, report: Report) -> Probe | None:
    G, sampling = config.group_size, config.sampling
    tokenizer = setup.tokenizer
    prompts = [r["prompt"] for r in setup.rows]
    try:
        prompt_ids, prompt_mask, _ = encode_prompts(tokenizer, prompts, config.data.max_prompt_tokens, setup.device)
    except DataError as e:
        report.fatal("data", str(e))
        return None
    generator = torch.Generator(device=setup.device).manual_seed(config.seed)

    def sample(ids, mask):
        return sample_completions(setup.model, ids, mask, G, sampling, tokenizer.eos_token_id,
                                  tokenizer.pad_token_id, generator, autocast=setup.autocast)

    sample(prompt_ids[:1], prompt_mask[:1])  # warm-up: first calls pick kernels and allocate
    started = time.perf_counter()
    with SamplerLogprobs(sampling, tokenizer.eos_token_id) as recorder:
        rollout = sample(prompt_ids, prompt_mask)
    generation_seconds = time.perf_counter() - started
    completions = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
    rows = [r for r in setup.rows for _ in range(G)]
    try:
        scores = _score(setup, rows, completions, on_error=config.reward_on_error)
    except RewardError as e:
        report.fatal("rewards", f"on sampled answers: {e}")
        return None
    logps = recorder.assemble(len(rows), rollout.completion_ids)
    probe = Probe(setup.rows, prompt_ids, prompt_mask, rollout.completion_ids, rollout.completion_mask,
                  rollout.finished, completions, scores.total, scores.per_function, scores.names, G,
                  logps[0] if logps else None, logps[1] if logps else None, generation_seconds)
    _report_sampling(setup, probe, config, gold, scores.num_failed, report)
    return probe


def _report_sampling(setup: Setup, probe: Probe, config, gold: Gold | None, failed: int, report: Report) -> None:
    G, sampling = probe.group_size, config.sampling
    for i in range(min(2, len(probe.rows))):
        answers = "; ".join(f"{probe.completions[i * G + j]!r} -> {float(probe.totals[i * G + j]):g}"
                            for j in range(min(SHOWN, G)))
        report.info("sampling", f"prompt {_short(probe.rows[i]['prompt'])}: {answers}")
    share = zero_std_group_fraction(probe.totals, G)
    per_function = ", ".join(f"{n} {float(probe.per_function[:, j].nanmean()):.3f}" for j, n in enumerate(probe.names))
    finished = float(probe.finished.float().mean())
    report.ok("sampling", f"{G} answers to each of {len(probe.rows)} prompts at temperature {sampling.temperature:g} "
                          f"(top_p {sampling.top_p:g}, top_k {sampling.top_k}): mean reward "
                          f"{float(probe.totals.nanmean()):.3f} ({per_function}); {share:.0%} of groups with zero "
                          f"reward spread; {finished:.0%} ended with EOS within {sampling.max_new_tokens} tokens")
    if failed:
        report.warn("rewards", f"reward functions failed on {failed} sampled answers (reward_on_error=skip)")
    for j, name in enumerate(probe.names):
        if torch.isnan(probe.per_function[:, j]).all():
            report.warn("rewards", f"reward {name} returned None for every sampled answer: it adds nothing")
    _check_reward_varies(probe, gold, report)
    if share >= ZERO_SPREAD_ADVICE:
        _zero_spread_advice(setup, probe, config, gold, share, report)
    if finished < 0.5:
        report.warn("sampling", f"{1 - finished:.0%} of answers hit sampling.max_new_tokens={sampling.max_new_tokens} "
                                "without EOS: they are cut and scored unfinished; raise it, or warm-start with SFT "
                                "so the model learns to stop")


def _check_reward_varies(probe: Probe, gold: Gold | None, report: Report) -> None:
    """A reward that gives every answer, sampled, gold or corrupted, the same score can teach nothing."""
    seen = [probe.totals]
    if gold is not None:
        seen += [gold.totals, gold.wrong_totals]
    values = torch.cat(seen)
    values = values[~torch.isnan(values)]
    if values.numel() and bool((values == values[0]).all()):
        report.fatal("rewards", f"the total reward is {float(values[0]):g} for every answer tried (sampled, gold and "
                                "corrupted): it never varies within a group, so every advantage is 0 and GRPO "
                                "learns nothing; check the reward functions")


def _zero_spread_advice(setup: Setup, probe: Probe, config, gold: Gold | None, share: float, report: Report) -> None:
    G = probe.group_size
    groups = probe.totals.view(-1, G)
    best = float(gold.totals.nanmean()) if gold is not None and not torch.isnan(gold.totals).all() else \
        float(torch.nan_to_num(probe.totals, nan=-1e30).max())
    all_right = sum(bool((g == best).all()) for g in groups)
    if all_right * 2 > len(groups):
        report.warn("sampling", f"{share:.0%} of groups score the same, mostly all right: the prompts are too easy "
                                "for this policy to learn from; use harder ones")
        return
    start = ("a freshly built model earns no reward: warm-start it with SFT on demonstrations (policyopt sft, then "
             "model.name_or_path=runs/sft/final)" if setup.built_tiny else
             "warm-start with (more) SFT on demonstrations")
    report.warn("sampling", f"{share:.0%} of groups gave all {G} answers the same reward, mostly all wrong: almost "
                            f"no learning signal. {start}; lower sampling.temperature (now "
                            f"{config.sampling.temperature:g}: a lower one keeps a weak policy's samples closer to its "
                            "best answers); or start on easier prompts. A larger group_size finds more groups that differ")


def _check_gold_is_the_maximum(gold: Gold | None, probe: Probe, report: Report) -> None:
    if gold is None:
        return
    G = probe.group_size
    for k, i in enumerate(gold.rows):
        group = probe.totals[i * G:(i + 1) * G]
        if torch.isnan(group).all() or torch.isnan(gold.totals[k]):
            continue
        j = int(torch.nan_to_num(group, nan=-1e30).argmax())
        if float(group[j]) > float(gold.totals[k]) + 1e-6:
            report.fatal("gold", f"a sampled answer {probe.completions[i * G + j]!r} scores {float(group[j]):g} but "
                                 f"the gold answer {gold.texts[k]!r} only {float(gold.totals[k]):g}: the reward's "
                                 "maximum is not the right answer, so GRPO will learn something else")
            return
    report.ok("gold", "no sampled answer scores more than the gold answer to its prompt")


# ---------------------------------------------------------------------------------------------- log-probs

def _check_logprobs(setup: Setup, probe: Probe, config, report: Report) -> None:
    """The sampler's log pi of its tokens against the trainer's forward (train mode, as the update runs it)."""
    if probe.sampler_logp is None:
        report.warn("logprobs", "could not follow the sampler's batch: log-prob check skipped")
        return
    tokens = probe.tokens()
    n = tokens.completion_ids.size(0)
    was_training = setup.model.training
    setup.model.train()  # the update's mode: dropout, if the model has any, is on there
    started = time.perf_counter()
    with torch.no_grad():
        logp, _, _ = forward_rows(setup.model, tokens, torch.arange(n), temperature=config.sampling.temperature,
                                  layout=getattr(config, "forward_layout", "auto"), autocast=setup.autocast)
    probe.timings["forward"] = time.perf_counter() - started
    setup.model.train(was_training)
    width = logp.size(1)
    mask = tokens.completion_mask[:, :width].bool().cpu()
    trainer = logp.float().cpu()
    diff = (trainer - probe.sampler_logp[:, :width])[mask].abs()
    tolerance = LOGPROB_TOLERANCE[setup.precision]
    where = f"over {int(mask.sum())} answer tokens (tolerance {tolerance:g} nats in {setup.precision})"
    if float(diff.max()) > tolerance:
        dropout = _dropout(setup.model)
        cause = (f"the model has dropout {dropout:g}, active in the trainer's train-mode forward: set it to 0"
                 if dropout else "the two forwards see different positions, padding or attention masks")
        report.fatal("logprobs", f"sampler and trainer log-probs differ by up to {float(diff.max()):.3g} nats (mean "
                                 f"{float(diff.mean()):.3g}) {where}: the first update's ratio pi/pi_old is off by "
                                 f"up to x{float(diff.max().exp()):.3g}; likely cause: {cause}")
    else:
        report.ok("logprobs", f"sampler and trainer log-probs agree: max |diff| {float(diff.max()):.2g}, mean "
                              f"{float(diff.mean()):.2g} nats {where}")
    if config.sampling.top_p < 1 or config.sampling.top_k:
        gap = float((probe.drawn_logp[:, :width] - probe.sampler_logp[:, :width])[mask].mean())
        report.warn("logprobs", f"top_p/top_k sampling draws from a truncated distribution, {gap:.3g} nats per token "
                                "above the full-vocabulary log-probs the trainer uses: pi_old is not the sampling "
                                "distribution (sampling.top_p=1 and top_k=0 keep them equal)")


def _dropout(model: torch.nn.Module) -> float:
    return max([m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
               + [float(v) for k, v in vars(getattr(model, "config", object())).items()
                  if "dropout" in k and isinstance(v, (int, float))], default=0.0)


# ---------------------------------------------------------------------------------------------- micro-batches

def _grpo_loss(setup: Setup, tokens: TokenBatch, config, seed: int, reference_from: torch.Tensor | None = None):
    """``pieces -> (loss, flat gradient)``: GRPO's micro-batch loss (recipes/grpo.py) summed over the pieces and
    backpropagated, with random advantages (any values: the split must not change the result) and, when
    beta > 0, a reference a little off ``reference_from`` so the KL term has a gradient too."""
    from .grpo import GRPOConfig, micro_batch_loss

    n = tokens.completion_ids.size(0)
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(GRPOConfig) if hasattr(config, f.name)}
    grpo = GRPOConfig(**{**shared, "prompts_per_step": n // tokens.group_size, "num_minibatches": 1,
                         "update_epochs": 1})
    generator = torch.Generator().manual_seed(seed)
    advantages = torch.randn(n, generator=generator).to(setup.device)
    reference = None
    if config.beta > 0:
        base = reference_from if reference_from is not None else torch.zeros(tokens.completion_ids.shape)
        reference = (base + 0.05 * torch.randn(base.shape, generator=generator)).to(setup.device)
    actors = types.SimpleNamespace(policy=setup.model, autocast=setup.autocast)
    counts = (float(n), float(tokens.completion_mask.sum()))  # the loss normaliser's answers and tokens
    # grpo.py's micro_batch_loss takes (loss_mask, (answers, tokens)) since the overlong filter; before, the tokens
    normaliser = ((tokens.completion_mask, counts) if "loss_mask" in inspect.signature(micro_batch_loss).parameters
                  else (counts[1],))

    def loss_and_gradient(pieces):
        setup.model.zero_grad(set_to_none=True)
        total = 0.0
        for rows in pieces:
            loss = micro_batch_loss(actors, tokens, rows, advantages, None, reference, *normaliser, grpo,
                                    defaultdict(float))
            loss.backward()
            total += float(loss.detach())
        grads = [p.grad.flatten().float() for p in setup.model.parameters() if p.grad is not None]
        setup.model.zero_grad(set_to_none=True)
        return total, torch.cat(grads) if grads else torch.zeros(1)

    return loss_and_gradient


def _check_micro_batches(setup: Setup, probe: Probe, config, report: Report) -> None:
    """GRPO's loss and gradient on the probe rollout in one forward, and split as the settings split it."""
    tokens = probe.tokens()
    n = tokens.completion_ids.size(0)
    loss_and_gradient = _grpo_loss(setup, tokens, config, config.seed, probe.sampler_logp)
    row_tokens = tokens.row_tokens()
    everything = torch.arange(n, device=setup.device)
    configured = split_rows(everything, config.grad_accum_steps, row_tokens, config.max_tokens_per_forward)
    how = f"grad_accum_steps={config.grad_accum_steps}, max_tokens_per_forward={config.max_tokens_per_forward}"
    if len(configured) < 2:  # the probe is too small for the settings to split it: split it anyway
        cut = int(row_tokens.sum()) // 3 + 1
        configured = split_rows(everything, 2, row_tokens, cut)
        how = f"2 micro-batches cut at {cut} tokens (the settings do not split a rollout this small)"
    was_training = setup.model.training
    setup.model.train()
    loss_and_gradient([everything[:1]])  # warm-up: the first backward allocates
    with PeakMemory(setup.device) as memory:
        started = time.perf_counter()
        whole_loss, whole_grad = loss_and_gradient([everything])
        probe.timings["update"] = time.perf_counter() - started
    probe.timings["memory"] = memory
    split_loss, split_grad = loss_and_gradient(configured)
    setup.model.train(was_training)
    relative = float((whole_grad - split_grad).norm() / whole_grad.norm().clamp(min=1e-30))
    tolerance = GRADIENT_TOLERANCE[setup.precision]
    loss_gap = abs(whole_loss - split_loss) / max(abs(whole_loss), 1e-12)
    detail = (f"loss {whole_loss:.6g} in one forward, {split_loss:.6g} in {len(configured)} micro-batches ({how}); "
              f"gradients differ by {relative:.2g} relative (tolerance {tolerance:g} in {setup.precision})")
    if relative > tolerance or loss_gap > tolerance:
        report.fatal("microbatch", f"the loss depends on how the batch is split: {detail}")
    else:
        report.ok("microbatch", detail)


class PeakMemory:
    """Peak memory while active, in MB: CUDA's max_memory_allocated on a GPU, else the process RSS (psutil,
    sampled every 2 ms by a thread)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start_mb = self.peak_mb = 0.0

    def _now(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        return self._process.memory_info().rss / 2**20

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            self._process = psutil.Process()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
        self.start_mb = self.peak_mb = self._now()
        if not self.cuda:
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_mb = max(self.peak_mb, self._now())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._now())


# ---------------------------------------------------------------------------------------------- template

def _check_chat_template(setup: Setup, report: Report) -> None:
    tokenizer = setup.tokenizer
    chat = [r["prompt"] for r in setup.rows if isinstance(r["prompt"], list)]
    if not getattr(tokenizer, "chat_template", None):
        if chat:
            report.fatal("template", "the prompts are chat messages but the tokenizer has no chat template")
        else:
            report.info("template", "no chat template; the prompts are plain text, sent as they are")
        return
    messages = chat[0] if chat else [{"role": "user", "content": prompt_text(setup.rows[0]["prompt"])}]
    try:
        text = format_prompt(tokenizer, messages)
        answer = next((t for _, t in _renderings(setup.rows[0])), "42")
        conversation = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                                     tokenize=False)
    except Exception as e:  # a template can fail in many ways (jinja, roles it does not know)
        report.fatal("template", f"the chat template fails on a prompt: {type(e).__name__}: {e}")
        return
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    back = tokenizer.decode(ids)
    problems = []
    if back != text:
        problems.append(f"encode then decode changes the rendered prompt ({text[-40:]!r} -> {back[-40:]!r})")
    if not conversation.startswith(text):
        problems.append("the prompt rendered with the generation prompt is not the start of the prompt + answer "
                        "conversation, so training text and sampling text differ")
    if problems:
        report.warn("template", "; ".join(problems))
    else:
        report.ok("template", "the chat template round-trips: rendered, encoded and decoded back to the same text, "
                              "and the generation prompt starts the full conversation"
                              + ("" if chat else " (the data's prompts are plain strings, so it is not applied)"))


# ---------------------------------------------------------------------------------------------- cost

FULL_STEP_BUDGET = 20.0  # seconds: a full-size rollout and update this cheap is timed as it is, not scaled


def _estimate_cost(setup: Setup, probe: Probe, config, report: Report) -> None:
    """Seconds per step and peak memory: one full-size rollout and update timed when that is cheap (scaled
    from the probe, it would take under FULL_STEP_BUDGET), else scaled in proportion from the probe, which
    overstates the time (part of it is per call, not per answer)."""
    scale = config.rollout_size / probe.completion_ids.size(0)
    generation, update = probe.generation_seconds * scale, probe.timings.get("update", 0.0) * scale
    measured_at, tokens = f"scaled from {probe.completion_ids.size(0)} answers (an upper bound)", probe.tokens()
    memory = probe.timings.get("memory") or PeakMemory(setup.device)
    if generation + update <= FULL_STEP_BUDGET:
        with PeakMemory(setup.device) as memory:
            generation, update, tokens = _time_full_step(setup, probe, config)
        measured_at = f"one step of {config.rollout_size} answers, timed"
    extra_passes = int(config.update_epochs > 1 or config.num_minibatches > 1) + int(config.beta > 0)
    update = update * config.update_epochs + extra_passes * probe.timings.get("forward", 0.0) * scale
    per_step = generation + update
    evaluations = (config.steps // config.eval_every if config.eval_every else 0) + 2
    eval_seconds = generation / config.rollout_size * len(setup.eval_rows)  # greedy: one answer per row
    total = per_step * config.steps + eval_seconds * evaluations
    report.info("cost", f"~{per_step:.2f} s per step (sampling {generation:.2f} s, update {update:.2f} s), "
                        f"~{total / 60:.1f} min for {config.steps} steps and {evaluations} evaluations of "
                        f"{len(setup.eval_rows)} rows: {measured_at}, on this machine under its present load")
    parameters = sum(p.numel() * p.element_size() for p in setup.model.parameters()) / 2**20
    state = 2 * parameters + (parameters if config.beta > 0 else 0.0)  # AdamW's two moments (+ the reference)
    measured_tokens = float(tokens.row_tokens().sum())
    forward_tokens = config.minibatch_size / config.grad_accum_steps * measured_tokens / tokens.completion_ids.size(0)
    if config.max_tokens_per_forward:
        forward_tokens = min(forward_tokens, config.max_tokens_per_forward)
    activations = max(memory.peak_mb - memory.start_mb, 0.0) * max(forward_tokens / measured_tokens, 1.0)
    where = "allocated on the GPU" if setup.device.type == "cuda" else "process RSS"
    report.info("memory", f"peak ~{memory.start_mb + state + activations:.0f} MB ({where}): {memory.start_mb:.0f} MB "
                          f"now, + {state:.0f} MB AdamW state{' and the reference model' if config.beta > 0 else ''}"
                          f", + ~{activations:.0f} MB gradients and activations for {forward_tokens:.0f} tokens per "
                          f"forward (measured on {measured_tokens:.0f})")


def _time_full_step(setup: Setup, probe: Probe, config) -> tuple[float, float, TokenBatch]:
    """(sampling seconds, one update pass's seconds, the tokens) for prompts_per_step prompts (the probe's,
    repeated) x G answers, split into micro-batches as the run splits them."""
    tokenizer, G = setup.tokenizer, probe.group_size
    rows = [probe.rows[i % len(probe.rows)] for i in range(config.prompts_per_step)]
    ids, mask, _ = encode_prompts(tokenizer, [r["prompt"] for r in rows], config.data.max_prompt_tokens, setup.device)
    generator = torch.Generator(device=setup.device).manual_seed(config.seed + 1)
    started = time.perf_counter()
    rollout = sample_completions(setup.model, ids, mask, G, config.sampling, tokenizer.eos_token_id,
                                 tokenizer.pad_token_id, generator, autocast=setup.autocast)
    generation = time.perf_counter() - started
    tokens = TokenBatch(*trim_padding(ids, mask, rollout.completion_ids, rollout.completion_mask), group_size=G)
    loss_and_gradient = _grpo_loss(setup, tokens, config, config.seed)
    everything = torch.arange(tokens.completion_ids.size(0), device=setup.device)
    was_training = setup.model.training
    setup.model.train()
    started = time.perf_counter()
    for minibatch in everything.tensor_split(config.num_minibatches):
        loss_and_gradient(split_rows(minibatch, config.grad_accum_steps, tokens.row_tokens(),
                                     config.max_tokens_per_forward))
    update = time.perf_counter() - started
    setup.model.train(was_training)
    return generation, update, tokens


# ---------------------------------------------------------------------------------------------- SFT

def _doctor_sft(config, report: Report) -> None:
    from .sft import nll, nll_rows, sft_rewards

    try:
        if config.data.path is None:
            from ..data.sources import demonstration_rows

            train_rows, eval_rows = demonstration_rows(config.data, config.seed)
            origin = f"{len(eval_rows)} built-in problems (data.eval_size)"
        else:
            source = PromptSource(config.data, config.seed, require_column=config.data.completion_column)
            train_rows, eval_rows, origin = source.train_rows, source.eval_rows, source.eval_origin
    except DataError as e:
        report.fatal("data", str(e))
        return
    report.ok("data", f"{len(train_rows)} demonstrations; held out: {origin}")
    column = config.data.completion_column
    completions = [completion_text(r[column]) if column in r else completion_for(r["answer"]) for r in train_rows]
    loaded = _load_model(config.model, [prompt_text(r["prompt"]) + c for r, c in zip(train_rows, completions)],
                         config.seed, report)
    rewards = _load_rewards(sft_rewards(config, train_rows, eval_rows), report)
    if loaded is None or rewards is None:
        return
    model, tokenizer, device, autocast = loaded
    rows = random.Random(config.seed).sample(train_rows, min(PROBE_PROMPTS, len(train_rows)))
    setup = Setup(rows, eval_rows, model, tokenizer, device, autocast, rewards, config.model.name_or_path is None)
    scored = nll_rows(config, eval_rows)
    report.info("eval", f"eval/nll scores {len(scored)} of {len(eval_rows)} held-out rows' completions"
                        + ("; accuracy: " + ", ".join(n for n, _, _ in rewards) if rewards else
                           "; accuracy is not measured (no rewards; rewards=my_rewards.py:fn measures it)"))
    if rewards:
        _check_gold(setup, config.max_new_tokens, report)
    lengths = [prompt_length(tokenizer, r["prompt"]) + len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1
               for r, c in zip(train_rows[:500], completions[:500])]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(lengths) > limit:
        report.warn("data", f"{sum(n > limit for n in lengths)} demonstrations are longer than the model's "
                            f"{limit} positions (up to {max(lengths)} tokens)")
    _check_chat_template(setup, report)
    batch = [train_rows[i % len(train_rows)] for i in range(config.batch_size)]
    model.train()
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        loss, _ = nll(model, tokenizer, batch, config, device, autocast)
        loss.backward()
        seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    report.info("cost", f"~{seconds:.2f} s per step of {config.batch_size} demonstrations (one measured), ~"
                        f"{seconds * config.steps / 60:.1f} min for {config.steps} steps; peak ~"
                        f"{memory.peak_mb + 2 * parameters:.0f} MB (measured {memory.peak_mb:.0f} MB for one step, "
                        f"+ {2 * parameters:.0f} MB AdamW state)")


# ---------------------------------------------------------------------------------------------- grpo's start

def preflight(actors, config) -> list[str]:
    """The cheapest doctor checks, run by grpo at its start; returns the warnings it logged.

    On a few rows: the rewards score the gold answers (a reward that gives them 0, or none that applies,
    cannot be learned), and the built-in accuracy/format rewards are checked against the data (an
    ``answer`` column) and the policy's greedy answers (``<answer>`` tags). Greedy decoding draws no random
    numbers and the model's weights and mode are left as they were, so the run is unchanged.
    """
    rows = (actors.source.train_rows or actors.source.eval_rows)[:PREFLIGHT_ROWS]
    if not rows:
        return []
    report = Report(echo=None)
    setup = Setup(rows, [], actors.policy, actors.tokenizer, actors.device, actors.autocast,
                  actors.reward_functions, config.model.name_or_path is None)
    _check_columns(config.rewards, rows, report)
    if not report.levels("rewards") & {"FATAL"}:
        gold = _check_gold(setup, config.sampling.max_new_tokens, report)
        if gold is not None and not torch.isnan(gold.totals).all() and float(gold.totals.nanmean()) <= 0:
            report.warn("gold", "the rewards give 0 to the gold answers on these rows")
        _check_builtin_format(setup, config, report)
    messages = [f"{f.check}: {f.message}" for f in report.findings if f.level in ("WARN", "FATAL")]
    for message in messages:
        log.warning("preflight: %s (policyopt doctor checks more)", message)
    return messages


def _check_builtin_format(setup: Setup, config, report: Report) -> None:
    """The built-in rewards read <answer>...</answer>: warn when the policy's greedy answers never contain it."""
    if not {spec.function for spec in config.rewards} & {"accuracy", "format"}:
        return
    tokenizer = setup.tokenizer
    ids, mask, _ = encode_prompts(tokenizer, [r["prompt"] for r in setup.rows], config.data.max_prompt_tokens,
                                  setup.device)
    greedy = dataclasses.replace(config.sampling, temperature=0.0)
    rollout = sample_completions(setup.model, ids, mask, 1, greedy, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                 autocast=setup.autocast)
    answers = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask)
    if not any(OPEN in a and CLOSE in a for a in answers):
        report.warn("rewards", f"the built-in accuracy/format rewards read {OPEN}X{CLOSE}, which none of the "
                               f"policy's greedy answers to {len(answers)} prompts contains (e.g. {answers[0]!r}): "
                               "warm-start with SFT on demonstrations in that format, or give your own reward "
                               "(rewards=my_rewards.py:fn)")

