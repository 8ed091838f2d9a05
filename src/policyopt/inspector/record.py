"""What a GRPO step records for ``policyopt inspect``: a few groups, as the update saw them.

For each recorded group (a prompt and its G answers) one JSON line in ``RUN_DIR/inspect/steps.jsonl``:
the prompt and the answers (text and tokens), each reward function's score, the weighted total, the
advantage A_i the run trained with, and per answer token

    log pi_old(o_t)         the policy that sampled the step (before its update)
    log r_t = log pi_theta(o_t) - log pi_old(o_t)    with pi_theta the policy AFTER the step's update
    H_t                     the entropy of pi_old's next-token distribution
    kl_t = KL estimator(log pi_old, log pi_ref)      the loss's KL term when the update began (beta > 0 only)
    clipped_t               the run's policy loss's own clipping rule applied to that ratio

and, at a few positions (where |A_i * log r_t| is largest), the top next tokens under pi_old, pi_theta
after the update and pi_ref. All distributions are the trainer's: softmax(logits / temperature).

Recording never changes training. It draws no random numbers (the group is chosen by rule: the groups
whose rewards differ first, starting at index (step - 1) mod groups), its forwards run without gradients
in eval mode (no dropout draws), and it touches no optimizer, scheduler or data state. Only rank 0
records; under fsdp every rank joins the weight gathering it needs. On resume, records of the steps
after the checkpoint are dropped, as ``metrics.jsonl``'s are, so the file never holds a step twice.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..algorithms import KL_ESTIMATORS, POLICY_LOSSES, policy_log_ratio, zero_spread_groups
from ..models.loading import autocast_context
from ..runtime.distributed import world

RECORDS_FILE = Path("inspect") / "steps.jsonl"  # under the run's output_dir
AUTO_RECORDS = 100  # inspect.every=0 records about this many steps per run
TOKENS_PER_GROUP = 1024  # per-token values are kept for at most this many answer tokens per group
POSITIONS = 4  # next-token distributions are kept at this many positions per group
TOP_SHOWN = 5  # the top tokens of each distribution at those positions
TOP_KEPT = 20  # the top tokens looked up in the other distributions (beyond them: only an upper bound)


@dataclass
class InspectConfig:
    """What a GRPO run records for ``policyopt inspect RUN_DIR`` (RUN_DIR/inspect/steps.jsonl)."""

    # groups (a prompt and its G answers) recorded at each recorded step, those whose rewards differ first;
    # 0: record nothing. A few kB per group (values per token, the top 5 next tokens at 4 positions)
    groups: int = 1
    every: int = 0  # record every N steps (0: auto, every max(1, steps // 100)); the first and last step always

    def validate(self) -> None:
        if self.groups < 0 or self.every < 0:
            raise ValueError(f"inspect.groups and inspect.every must be >= 0 (0: off / auto), got "
                             f"{self.groups} and {self.every}")


def recorded_every(settings: InspectConfig, total_steps: int) -> int:
    return settings.every or max(1, total_steps // AUTO_RECORDS)


def is_recorded(step: int, settings: InspectConfig, total_steps: int) -> bool:
    """Steps 1, 1 + every, 1 + 2 * every, ... and the last one."""
    if not settings.groups:
        return False
    return step == total_steps or (step - 1) % recorded_every(settings, total_steps) == 0


def chosen_groups(rewards: torch.Tensor, group_size: int, count: int, step: int) -> list[int]:
    """The ``count`` groups recorded: in the order (step - 1) mod B, step mod B, ..., those whose rewards
    differ (the ones that carry a gradient) first. A rule, so no random number is drawn."""
    num_groups = rewards.numel() // group_size
    if not num_groups or not count:
        return []
    flat = zero_spread_groups(rewards.detach().float().cpu(), group_size).tolist()
    order = [(step - 1 + k) % num_groups for k in range(num_groups)]
    return ([g for g in order if not flat[g]] + [g for g in order if flat[g]])[:count]


@contextlib.contextmanager
def inspected_update(run, actors, config, step: int, scored, advantages: torch.Tensor):
    """Wrap a GRPO step's update: ``with inspected_update(...): update_policy(...)``.

    On a recorded step, reads pi_old and pi_ref for the chosen groups before the update and pi_theta
    after it, then appends their records (rank 0). ``config``: the run's GRPOConfig (``inspect``,
    ``steps``, the loss settings); ``scored``, ``advantages``: the batch the update trains on.
    """
    ranks = world()
    if ranks.is_main and step == run.first_step:
        start_records(run.out / RECORDS_FILE, run.resuming, run.first_step)
    if not is_recorded(step, config.inspect, config.steps):
        yield
        return
    G = scored.tokens.group_size
    groups = chosen_groups(scored.scores.total, G, config.inspect.groups, step) if ranks.is_main else []
    cap = max(16, TOKENS_PER_GROUP // G)
    temperature = config.sampling.temperature
    with ranks.unsharded(actors.policy):  # under fsdp a collective: every rank enters, rank 0 reads
        before = [(group_distributions(actors.policy, scored.tokens, g, cap, temperature, actors.autocast),
                   None if actors.reference is None else
                   group_distributions(actors.reference, scored.tokens, g, cap, temperature, actors.autocast))
                  for g in groups]
    yield
    with ranks.unsharded(actors.policy):
        after = [group_distributions(actors.policy, scored.tokens, g, cap, temperature, actors.autocast)
                 for g in groups]
    if not groups:
        return
    path = run.out / RECORDS_FILE
    with path.open("a") as f:
        for g, (old, ref), new in zip(groups, before, after):
            record = group_record(step, g, scored, advantages, old, new, ref, config, actors.tokenizer)
            f.write(json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n")
            f.flush()


def start_records(path: Path, resuming: bool, first_step: int) -> None:
    """A fresh run starts with no records; a resumed one keeps those of the steps before ``first_step``
    (a run killed after its checkpoint may have written later ones, and a torn last line)."""
    if not resuming:
        path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [line for line in _lines(path) if _step_of(line) is not None and _step_of(line) < first_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line if line.endswith("\n") else line + "\n" for line in path.read_text().splitlines() if line.strip()]


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line torn by a kill mid-write


def read_records(path: str | Path) -> list[dict]:
    """The records in ``path`` in file order, skipping a torn last line (a run killed mid-write)."""
    records = []
    for line in _lines(Path(path)):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


@dataclass
class AnswerDistributions:
    """One answer's tokens under one model: [L] each, and the top TOP_KEPT next tokens [L, K]."""

    token_logp: torch.Tensor  # log pi(o_t | q, o_<t)
    entropy: torch.Tensor  # H(pi(. | q, o_<t))
    top_logp: torch.Tensor
    top_ids: torch.Tensor


@torch.no_grad()
def group_distributions(model, tokens, group: int, cap: int, temperature: float, autocast) -> list[AnswerDistributions]:
    """Each answer of ``group`` (its first ``cap`` tokens) under ``model``, one unpadded forward per answer
    ([prompt | answer], so no attention mask), in eval mode; logits / temperature as the trainer takes them."""
    tau = temperature if temperature > 0 else 1.0  # as algorithms.gather_logprobs: greedy (0) means untempered
    prompt = tokens.prompt_ids[group][tokens.prompt_mask[group].bool()]
    G = tokens.group_size
    module = model if isinstance(model, torch.nn.Module) else None  # LoRA's pi_ref sets eval mode itself
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    out = []
    try:
        for row in range(group * G, (group + 1) * G):
            length = min(int(tokens.completion_mask[row].sum()), cap)
            answer = tokens.completion_ids[row, :length]
            ids = torch.cat([prompt, answer])[None]
            with autocast_context(ids.device, autocast):
                logits = model(input_ids=ids, logits_to_keep=length + 1).logits[0, :length]
            logp = torch.log_softmax(logits.float() / tau, dim=-1)  # column t predicts answer token t
            top = logp.topk(min(TOP_KEPT, logp.size(-1)), dim=-1)
            out.append(AnswerDistributions(logp.gather(1, answer[:, None])[:, 0].cpu(),
                                           -(logp.exp() * logp).sum(-1).cpu(), top.values.cpu(), top.indices.cpu()))
    finally:
        if module is not None:
            module.train(was_training)
    return out


def token_text(tokenizer, token: int) -> str:
    """One token as text; a byte-level piece of a multi-byte character (which decodes alone to U+FFFD)
    as the tokenizer's own spelling of it."""
    text = tokenizer.decode([token])
    return text if "\ufffd" not in text else str(tokenizer.convert_ids_to_tokens(token))


def _round(value: float, digits: int = 4):
    """``digits`` significant digits; None for NaN or inf (JSON has neither: a missing value)."""
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None


def _rounded(values: torch.Tensor) -> list:
    return [_round(v) for v in values.tolist()]


def _padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, L] values and mask from G rows of different lengths."""
    width = max([r.numel() for r in rows] + [1])
    values, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        values[i, :r.numel()], mask[i, :r.numel()] = r, 1.0
    return values, mask


def group_record(step: int, group: int, scored, advantages: torch.Tensor, old: list[AnswerDistributions],
                 new: list[AnswerDistributions], ref: list[AnswerDistributions] | None, config, tokenizer) -> dict:
    """One recorded group as a JSON-ready dict (see the module docstring for what each field is)."""
    tokens, G = scored.tokens, scored.tokens.group_size
    rows = list(range(group * G, (group + 1) * G))
    A = advantages.detach().float().cpu()[rows]
    old_logp, mask = _padded([d.token_logp for d in old])
    new_logp, _ = _padded([d.token_logp for d in new])
    # the run's own loss decides what is clipped, and which ratio it clips (GSPO: one per answer)
    _, clipped = POLICY_LOSSES.get_fn(config.policy_loss)(new_logp, old_logp, A, mask, config.clip_ratio_low,
                                                          config.clip_ratio_high)
    loss_log_ratio = policy_log_ratio(config.policy_loss, new_logp, old_logp, mask)
    kl = None
    if ref is not None:
        ref_logp, _ = _padded([d.token_logp for d in ref])
        kl = KL_ESTIMATORS.get_fn(config.kl_estimator)(old_logp, ref_logp)
    per_function, total = scored.scores.per_function[rows].float(), scored.scores.total[rows].float()
    weights = {spec.name: float(spec.weight) for spec in config.rewards}
    answers = []
    for i, row in enumerate(rows):
        length = old[i].token_logp.numel()
        ids = tokens.completion_ids[row, :length].tolist()
        valid_ids = [t for t, m in zip(tokens.completion_ids[row].tolist(), tokens.completion_mask[row].tolist()) if m]
        answer = {
            "text": tokenizer.decode(valid_ids, skip_special_tokens=True),  # what the reward functions read
            "length": len(valid_ids), "finished": bool(scored.finished[row]),
            "rewards": _rounded(per_function[i]), "reward": _round(total[i]), "advantage": _round(A[i]),
            "ids": ids, "pieces": [token_text(tokenizer, t) for t in ids],
            "logp_old": _rounded(old_logp[i, :length]),
            "log_ratio": _rounded(new_logp[i, :length] - old_logp[i, :length]),
            "entropy": _rounded(old[i].entropy),
            "clipped": [t for t in range(length) if clipped[i, t]],
        }
        if kl is not None:
            answer["kl"] = _rounded(kl[i, :length])
        if config.policy_loss not in ("ppo_clip", "cispo"):  # a sequence-level ratio, the same on every token
            answer["loss_log_ratio"] = _round(loss_log_ratio[i, 0]) if length else None
        answers.append(answer)
    valid = total[~total.isnan()]
    prompt_ids = tokens.prompt_ids[group][tokens.prompt_mask[group].bool()].tolist()
    return {
        "step": step, "recipe": "grpo", "group": group, "groups_in_batch": tokens.prompt_ids.size(0),
        "settings": run_settings(config),
        "prompt": tokenizer.decode(prompt_ids), "prompt_ids": prompt_ids,
        "reward_names": list(scored.scores.names),
        "reward_weights": [weights.get(name) for name in scored.scores.names],  # None: added, not weighted (overlong)
        "reward_mean": _round(valid.mean()) if valid.numel() else None,
        "reward_std": _round(valid.std()) if valid.numel() > 1 else None,  # unbiased, as the grpo estimator's
        "answers": answers,
        "positions": next_token_tables(A, old_logp, new_logp, mask, [a["ids"] for a in answers], old, new, ref,
                                       tokenizer),
    }


def run_settings(config) -> dict:
    """The settings a page needs to say what was computed."""
    return {"steps": config.steps, "group_size": config.group_size, "policy_loss": config.policy_loss,
            "clip_ratio_low": config.clip_ratio_low, "clip_ratio_high": config.clip_ratio_high,
            "beta": config.beta, "kl_estimator": config.kl_estimator, "temperature": config.sampling.temperature,
            "advantage_estimator": config.advantage_estimator, "scale_rewards": config.scale_rewards,
            "update_epochs": config.update_epochs, "num_minibatches": config.num_minibatches,
            "loss_aggregation": config.loss_aggregation, "every": recorded_every(config.inspect, config.steps)}


def next_token_tables(A, old_logp, new_logp, mask, sampled_ids, old, new, ref, tokenizer) -> list[dict]:
    """At the POSITIONS answer tokens where the update moved the most in the advantage's direction,
    |A_i * log r_t| (ties, e.g. all A = 0: |log r_t|), the union of the top TOP_SHOWN next tokens under
    pi_old, pi_theta after the update and pi_ref, each with its probability under the three ("p"; None:
    outside that model's top TOP_KEPT, so below its "floor", the TOP_KEPT-th probability). The sampled token
    ``sampled_ids[i][t]`` is always listed, first, with its exact probabilities."""
    change = (new_logp - old_logp).abs() * mask
    score = (A[:, None].abs() * change, change)
    candidates = [(i, t) for i in range(mask.size(0)) for t in range(int(mask[i].sum()))]
    candidates.sort(key=lambda it: (-float(score[0][it]), -float(score[1][it]), it))
    models = [old, new] + ([ref] if ref is not None else [])
    tables = []
    for i, t in sorted(candidates[:POSITIONS]):
        sampled = sampled_ids[i][t]
        union = [sampled]
        for d in models:
            for token in d[i].top_ids[t, :TOP_SHOWN].tolist():
                if token not in union:
                    union.append(token)
        entries = []
        for token in union:
            p = []
            for d in models:
                if token == sampled:  # known exactly under every model, in or out of its top tokens
                    p.append(_round(math.exp(float(d[i].token_logp[t]))))
                    continue
                hit = (d[i].top_ids[t] == token).nonzero()
                p.append(_round(math.exp(float(d[i].top_logp[t, hit[0, 0]]))) if hit.numel() else None)
            entries.append({"id": token, "piece": token_text(tokenizer, token), "sampled": token == sampled,
                            "p": p + [None] * (3 - len(p))})
        entries[1:] = sorted(entries[1:], key=lambda e: -(e["p"][0] or 0.0))
        floor = [_round(math.exp(float(d[i].top_logp[t, -1]))) for d in models]
        tables.append({"answer": i, "t": t, "score": _round(score[0][i, t]), "tokens": entries,
                       "floor": floor + [None] * (3 - len(floor))})
    return tables
