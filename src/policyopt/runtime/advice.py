"""Warnings while training: each step's metrics, read for the signs that a run has stopped learning.

Each rule looks at one step's metrics (and a little remembered history) and, when it holds, names the
likely cause and the setting to change. A rule that holds sets the metric ``warn/<rule>`` = 1 on that
step (absent otherwise), and is logged as a warning the first time and then at most every
``REPEAT_EVERY`` steps while it keeps holding. Rules that need a trend (not one noisy step) must hold for
``PATIENCE`` steps in a row. Metrics a recipe does not log never trigger anything, so every recipe can
pass its metrics through (``Run.log`` does). The memory is a plain dict kept in the run's checkpointed
values, so a resumed run warns exactly where the uninterrupted one would.

The metric names are the RL recipes' (``recipes/rl.py`` rollout_metrics, ``recipes/grpo.py`` and
``recipes/ppo.py`` step_metrics).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

log = logging.getLogger(__name__)

REPEAT_EVERY = 50  # a warning that keeps holding is logged again after this many steps
PATIENCE = 3  # steps in a row a trend rule must hold before it is reported

ZERO_SPREAD_SHARE = 0.9  # groups whose answers all got the same reward
ENTROPY_COLLAPSE_RATIO = 0.1  # entropy below this fraction of its first value ...
ENTROPY_COLLAPSE_ABSOLUTE = 0.05  # ... and below this many nats per token
CLIP_FRACTION_LIMIT = 0.3  # share of answer tokens whose ratio was clipped
KL_PER_TOKEN_LIMIT = 0.3  # nats per answer token away from the reference policy
FINISHED_SHARE_MIN = 0.5  # share of answers that ended with EOS before max_new_tokens


def _finite(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _setting(config: Any, dotted: str, default: Any = "?") -> Any:
    for part in dotted.split("."):
        config = getattr(config, part, None)
        if config is None:
            return default
    return config


def _zero_spread(metrics: dict, memory: dict, config: Any) -> str | None:
    share = _finite(metrics, "frac_reward_zero_std")
    if share is None or share < ZERO_SPREAD_SHARE:
        return None
    return (f"{share:.0%} of groups gave all {_setting(config, 'group_size')} answers the same reward (mean reward "
            f"{metrics.get('reward/mean', float('nan')):.3f}), so they carry no learning signal, and the few that "
            "differ still get a full-size AdamW step, which can lower accuracy. "
            "Mostly wrong: warm-start with SFT (policyopt sft) or train it longer, lower sampling.temperature (now "
            f"{_setting(config, 'sampling.temperature')}), or use easier prompts; "
            "mostly right: harder prompts. A larger group_size finds more groups that differ"
            + ("; beta=0.04 (now 0) keeps the policy near its start while the signal is this sparse"
               if _setting(config, "beta", None) == 0 else ""))


def _reward_failures(metrics: dict, memory: dict, config: Any) -> str | None:
    failed = metrics.get("reward_failures") or 0
    if not failed:
        return None
    return (f"reward functions failed on {failed} answers this step and scored them as missing "
            "(reward_on_error=skip): check the functions on those inputs, e.g. with policyopt doctor")


def _reward_missing(metrics: dict, memory: dict, config: Any) -> str | None:
    if "reward/mean" not in metrics:
        return None
    if _finite(metrics, "reward/mean") is None:
        return ("no reward function returned a value (all None) for any answer this step: the columns they need "
                "(e.g. answer) are missing from the data, or the functions never apply to these prompts")
    silent = [key[len("reward/"):-len("/mean")] for key in metrics
              if key.startswith("reward/") and key.endswith("/mean") and key != "reward/mean"
              and _finite(metrics, key) is None]
    if not silent:
        return None
    return (f"reward {', '.join(silent)} returned None for every answer this step, so it adds nothing: check that "
            "the dataset has the columns it reads")


def _entropy_collapse(metrics: dict, memory: dict, config: Any) -> str | None:
    entropy = _finite(metrics, "entropy")  # null on steps that trained on nothing
    if entropy is None:
        return None
    first = memory.setdefault("first_entropy", entropy)
    if entropy >= ENTROPY_COLLAPSE_ABSOLUTE or entropy >= ENTROPY_COLLAPSE_RATIO * first:
        return None
    return (f"entropy fell from {first:.3f} to {entropy:.3f} nats per token: the policy is nearly deterministic, so "
            f"the answers in a group stop differing. Lower optim.lr (now {_setting(config, 'optim.lr')}), raise "
            f"sampling.temperature (now {_setting(config, 'sampling.temperature')}), or set beta > 0 to hold the "
            "policy near its start")


def _clip_runaway(metrics: dict, memory: dict, config: Any) -> str | None:
    clipped = _finite(metrics, "clip_fraction")
    if clipped is None or clipped <= CLIP_FRACTION_LIMIT:
        return None
    return (f"{clipped:.0%} of answer tokens had their ratio pi/pi_old clipped: each update moves the policy far "
            f"from the one that sampled. Lower optim.lr (now {_setting(config, 'optim.lr')}) or use fewer "
            "update_epochs / num_minibatches per rollout")


def _kl_runaway(metrics: dict, memory: dict, config: Any) -> str | None:
    kl = _finite(metrics, "kl")
    if kl is None:
        return None
    if "kl_coef" in metrics:  # PPO logs the KL summed over each answer's tokens
        length = _finite(metrics, "completion_length") or 0.0
        kl = kl / length if length else 0.0
    if kl <= KL_PER_TOKEN_LIMIT:
        return None
    return (f"KL to the reference is {kl:.3f} nats per answer token, above {KL_PER_TOKEN_LIMIT}: the policy "
            f"is drifting from where it started. Raise beta (now {_setting(config, 'beta')}) or lower optim.lr")


def _truncated(metrics: dict, memory: dict, config: Any) -> str | None:
    finished = _finite(metrics, "frac_finished")
    if finished is None or finished >= FINISHED_SHARE_MIN:
        return None
    limit = _setting(config, "sampling.max_new_tokens")
    return (f"{1 - finished:.0%} of answers reached sampling.max_new_tokens={limit} without an end-of-sequence "
            "token, so they are cut and scored unfinished: raise sampling.max_new_tokens, or teach the model to "
            "stop (SFT completions end with EOS)")


Check = Callable[[dict, dict, Any], "str | None"]
# name -> (check, whether it must hold PATIENCE steps in a row)
RULES: dict[str, tuple[Check, bool]] = {
    "zero_reward_spread": (_zero_spread, True),
    "reward_failures": (_reward_failures, False),
    "reward_missing": (_reward_missing, False),
    "entropy_collapse": (_entropy_collapse, True),
    "clip_runaway": (_clip_runaway, True),
    "kl_runaway": (_kl_runaway, True),
    "answers_truncated": (_truncated, True),
}


def advise(memory: dict, step: int, metrics: dict, config: Any = None) -> list[str]:
    """Check ``metrics`` of ``step`` against every rule; set ``warn/<rule>`` = 1 in ``metrics`` for those that
    hold and log the ones due. ``memory`` (a plain dict, kept between calls) holds streaks and when each rule
    was last logged. Returns the messages logged at this step."""
    streaks = memory.setdefault("streak", {})
    last = memory.setdefault("last_logged", {})
    logged = []
    for name, (check, needs_trend) in RULES.items():
        message = check(metrics, memory, config)
        streaks[name] = streaks.get(name, 0) + 1 if message else 0
        if not message or (needs_trend and streaks[name] < PATIENCE):
            continue
        metrics[f"warn/{name}"] = 1
        if name not in last or step - last[name] >= REPEAT_EVERY:
            last[name] = step
            text = f"step {step}: {message}"
            log.warning("%s", text)
            logged.append(text)
    return logged
