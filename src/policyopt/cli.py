"""Command line: ``policyopt {demo,sft,grpo} [--config FILE] [--output-dir DIR] [key=value ...]``.

A thin layer: parse, build the typed config (YAML plus dotted overrides), call a recipe. User
mistakes (bad config, data, model path, reward function) print one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .data.loading import DataError
from .models.loading import ModelLoadError
from .rewards.combine import RewardError
from .runtime.config import ConfigError, load_config
from .runtime.optim import NonFiniteUpdates
from .runtime.signals import TrainingInterrupted

USER_ERRORS = (ConfigError, DataError, ModelLoadError, RewardError)


def _recipes():
    from .recipes.demo import DemoConfig, run_demo
    from .recipes.grpo import GRPOConfig, run_grpo
    from .recipes.pipeline import PipelineConfig, run_pipeline
    from .recipes.ppo import PPOConfig, run_ppo
    from .recipes.reward_model import RewardModelConfig, run_reward_model
    from .recipes.sft import SFTConfig, run_sft

    return {
        "demo": (DemoConfig, run_demo, "SFT warm start then GRPO on built-in arithmetic, with a tiny local model"),
        "sft": (SFTConfig, run_sft, "supervised fine-tuning on demonstrations (prompt + completion)"),
        "grpo": (GRPOConfig, run_grpo, "GRPO with verifiable reward functions"),
        "reward": (RewardModelConfig, run_reward_model, "train a Bradley-Terry reward model on pairs or rankings"),
        "ppo": (PPOConfig, run_ppo, "PPO with a value model, a KL-shaped per-token reward and GAE"),
        "pipeline": (PipelineConfig, run_pipeline,
                     "SFT -> reward model -> PPO and GRPO on the built-in task, with a cost report"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policyopt", description="Post-train language models with RL.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_text) in _recipes().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file")
        p.add_argument("--output-dir", help="where the run writes (same as output_dir=...)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        if name == "grpo":
            p.add_argument("--resume", action="store_true",
                           help="continue from the newest complete checkpoint in the output directory")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.lr=1e-4 sampling.temperature=0.8")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config_cls, run, _ = _recipes()[args.command]
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if getattr(args, "resume", False):
        overrides.append("resume=auto")
    try:
        config = load_config(config_cls, args.config, overrides)
        if args.print_config:
            import dataclasses

            import yaml

            print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
            return 0
        summary = run(config)
    except USER_ERRORS as exc:
        print(f"policyopt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteUpdates as exc:
        print(f"policyopt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"policyopt {args.command}: {exc}; continue with --resume", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"policyopt {args.command}: interrupted", file=sys.stderr)
        return 130
    printable = {k: v for k, v in summary.items() if k not in ("model", "tokenizer")}
    print(json.dumps(printable, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
