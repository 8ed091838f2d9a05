"""Command line: ``policyopt CMD [--config FILE|PRESET] [--output-dir DIR] [--resume] [key=value ...]``.

A thin layer: parse, build the typed config (YAML plus dotted overrides), call a recipe. User
mistakes (bad config, data, model path, reward function) print one clear line, not a traceback.
``policyopt CMD --help`` lists every config key with its default and meaning, read from the config
dataclasses' own comments, and examples that work as written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

from .data.loading import DataError
from .models.loading import ModelLoadError
from .rewards.combine import RewardError
from .runtime.config import ConfigError, config_keys, format_value, load_config, preset_names
from .runtime.optim import NonFiniteUpdates
from .runtime.signals import TrainingInterrupted

USER_ERRORS = (ConfigError, DataError, ModelLoadError, RewardError)


@dataclass(frozen=True)
class Command:
    """One ``policyopt`` command: its config, the recipe it runs, and how its help presents it."""

    config: type  # the config dataclass
    run: Callable[..., dict]  # the recipe: config -> summary
    help: str  # one line
    preset: str | None  # the preset --config defaults to (None: the config's own defaults)
    examples: tuple[tuple[str, tuple[str, ...]], ...]  # (what it does, the arguments after the command)


def commands() -> dict[str, Command]:
    from .recipes.demo import DemoConfig, run_demo
    from .recipes.doctor import run_doctor
    from .recipes.grpo import GRPOConfig, run_grpo
    from .recipes.pipeline import PipelineConfig, run_pipeline
    from .recipes.ppo import PPOConfig, run_ppo
    from .recipes.reward_model import RewardModelConfig, run_reward_model
    from .recipes.sft import SFTConfig, run_sft

    return {
        "demo": Command(DemoConfig, run_demo, "SFT warm start then GRPO on built-in arithmetic, with a tiny local model",
                        "demo", (
                            ("another seed, in a folder of its own", ("seed=1", "--output-dir", "runs/demo_seed1")),
                            ("a shorter GRPO stage, without the SFT control", ("grpo.steps=100", "sft_control=false")),
                            ("finish an interrupted demo", ("--resume",)),
                        )),
        "sft": Command(SFTConfig, run_sft, "supervised fine-tuning on demonstrations (prompt + completion)", None, (
            ("longer, with bigger batches and a lower learning rate", ("steps=500", "batch_size=64", "optim.lr=5e-4")),
            ("a larger tiny model on more demonstrations",
             ("model.tiny.hidden_size=128", "model.tiny.num_layers=4", "data.num_demonstrations=1000")),
            ("checkpoint every 100 steps; after an interruption, --resume continues exactly",
             ("--output-dir", "runs/sft", "save_every=100")),
        )),
        "grpo": Command(GRPOConfig, run_grpo, "GRPO with verifiable reward functions", None, (
            ("a lower learning rate and larger groups", ("optim.lr=1e-4", "group_size=16")),
            ("Dr. GRPO: no division by the group's std, a constant loss normaliser, accuracy reward only",
             ("scale_rewards=false", "loss_aggregation=seq_sum_constant", "rewards=[{function: accuracy}]")),
            ("harder sums; 4 passes over 4 minibatches per rollout; a checkpoint every 20 steps",
             ("data.task.max_digits=2", "update_epochs=4", "num_minibatches=4", "save_every=20")),
        )),
        "reward": Command(RewardModelConfig, run_reward_model,
                          "train a Bradley-Terry reward model on pairs or rankings", None, (
                              ("two passes, with TRL's reward centring", ("epochs=2", "center_rewards_coefficient=0.01")),
                              ("more built-in prompts, 10% of training pairs flipped",
                               ("data.builtin.num_prompts=4000", "data.builtin.label_noise=0.1", "optim.lr=5e-4")),
                          )),
        "ppo": Command(PPOConfig, run_ppo, "PPO with a value model, a KL-shaped per-token reward and GAE", None, (
            ("the critic as a separate model, and a KL coefficient that adapts to a target",
             ("value_model=separate", "adaptive_kl=true", "kl_target=3")),
            ("four answers per prompt, 2 passes over 4 minibatches",
             ("prompts_per_step=16", "group_size=4", "update_epochs=2", "num_minibatches=4")),
            ("continue an interrupted run from its newest checkpoint", ("--output-dir", "runs/ppo", "--resume")),
        )),
        "doctor": Command(GRPOConfig, run_doctor,
                          "check a run's config before training: data, model, rewards, sampling, log-probs, cost "
                          "(`doctor ppo|sft ...` reads that command's config; a FATAL finding exits 1)", None, (
                              ("check a GRPO run on your data before starting it", ("sampling.temperature=0.7",
                                                                                    "group_size=16")),
                              ("check a PPO config", ("ppo", "value_model=separate")),
                              ("check an SFT config", ("sft", "steps=100", "batch_size=16")),
                          )),
        "pipeline": Command(PipelineConfig, run_pipeline,
                            "SFT -> reward model -> PPO and GRPO on the built-in task, with a cost report",
                            "pipeline", (
                                ("PPO with the value head only against GRPO", ("run_ppo_separate_critic=false",)),
                                ("shorter RL stages (PPO and GRPO must match)", ("ppo.steps=50", "grpo.steps=50")),
                                ("the preset named explicitly, another seed", ("--config", "pipeline", "seed=1")),
                            )),
    }


def doctor_command(overrides: list[str]) -> tuple[Command, list[str]]:
    """``policyopt doctor [grpo|ppo|sft] ARGS``: the named command's config (default grpo), run through the doctor."""
    import functools

    from .recipes.doctor import DOCTOR_TARGETS, run_doctor

    target = overrides[0] if overrides and overrides[0] in DOCTOR_TARGETS else "grpo"
    rest = overrides[1:] if overrides and overrides[0] == target else overrides
    return dataclasses.replace(commands()[target], run=functools.partial(run_doctor, recipe=target)), rest


def default_config(name: str):
    """What ``policyopt NAME`` runs with when given no arguments."""
    command = commands()[name]
    return load_config(command.config, command.preset) if command.preset else command.config()


def config_help(name: str, width: int | None = None) -> str:
    """The part of ``policyopt NAME --help`` after the options: examples, then every config key."""
    command = commands()[name]
    width = width or min(shutil.get_terminal_size().columns, 110)
    lines = ["examples:"]
    for what, args in command.examples:
        lines += [f"  # {what}", f"  policyopt {name} {shlex.join(args)}"]
    values = f"the {command.preset} preset's values" if command.preset else "their defaults"
    lines += ["", f"config keys and {values}; set any with key=value, or in a YAML file given to --config:"]
    for key in config_keys(default_config(name)):
        lines.append(f"  {key.key} = {format_value(key.default)}  ({key.type})")
        if key.meaning:
            lines += textwrap.wrap(key.meaning, width=width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser whose epilog (the config keys) is built only when help is shown."""

    def __init__(self, *args, epilog_from: Callable[[], str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._epilog_from = epilog_from

    def format_help(self) -> str:
        if self._epilog_from is not None and self.epilog is None:
            self.epilog = self._epilog_from()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policyopt", description="Post-train language models with RL.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    presets = ", ".join(preset_names())
    for name, command in commands().items():
        p = sub.add_parser(name, help=command.help, description=command.help,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog_from=lambda name=name: config_help(name))
        default = (f"default: the {command.preset} preset; a file replaces it (start from a copy of "
                   f"policyopt/configs/{command.preset}.yaml)" if command.preset else "default: none, the defaults below")
        p.add_argument("--config", help=f"a YAML config file, or a preset's name ({presets}); {default}")
        p.add_argument("--output-dir", help="where the run writes (same as output_dir=...)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted run in the output directory (same as resume=auto)"
                            + ("; finished stages are kept" if command.preset else
                               ", exactly, from its newest complete checkpoint"))
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides in dotted form, e.g. " + " ".join(_overrides_in(command.examples)))
    add_inspect_parser(sub)
    return parser


def add_inspect_parser(sub) -> None:
    """``policyopt inspect RUN_DIR [--step N] [--output FILE]``: reads a run, trains nothing."""
    what = ("one recorded GRPO step as a self-contained HTML page: the group's answers, rewards and advantages, "
            "per-token ratio/KL/entropy maps, next-token distributions under pi_old, pi_theta and pi_ref, the "
            "clipped surrogate with the step's tokens, and the run's curves")
    p = sub.add_parser("inspect", help=what, description=textwrap.fill(
                           what + ". GRPO runs record a group every few steps by default (inspect.groups, "
                           "inspect.every); the page needs no network or server.", width=100),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  policyopt inspect runs/demo/grpo\n"
                              "  policyopt inspect runs/grpo --step 40 --output step40.html")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a GRPO run's output_dir (holding inspect/steps.jsonl)")
    p.add_argument("--step", type=int, help="the recorded step to show (default: the last one recorded)")
    p.add_argument("--output", help="where to write the page (default: RUN_DIR/inspect/step-N.html)")


def run_inspect(args: argparse.Namespace) -> int:
    from .inspector.page import InspectError, describe, write_page

    try:
        path = write_page(args.run_dir, args.step, args.output)
    except InspectError as exc:
        print(f"policyopt inspect: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"policyopt inspect: error: {exc.filename or args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(describe(path))
    return 0


def _overrides_in(examples) -> list[str]:
    return [a for _, args in examples for a in args if "=" in a and not a.startswith("-")][:2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and overrides in any order (``policyopt grpo steps=5 --resume optim.lr=1e-4``)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and argv[0] in subparsers.choices:
        args = subparsers.choices[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # no command: argparse's usage error or top-level help


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, rank 0 speaks for the run; the others only warn
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s" if rank == 0 else
                        f"%(levelname)s [rank {rank}] %(name)s: %(message)s")
    if not sys.stderr.isatty():  # transformers' "Loading weights" / "Writing model shards" bars clutter log files
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if args.command == "inspect":  # reads a finished or running run; no config, nothing trained
        return run_inspect(args)
    command = commands()[args.command]
    overrides = list(args.overrides)
    if args.command == "doctor":  # `doctor [grpo|ppo|sft] ARGS`: that command's config, checked
        command, overrides = doctor_command(overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append("resume=auto")
    try:
        config = load_config(command.config, args.config or command.preset, overrides)
        if args.print_config:
            import dataclasses

            import yaml

            print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
            return 0
        summary = command.run(config)
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
    if rank == 0:
        print(json.dumps(printable, indent=2, default=str))
    return int(summary.get("exit_code", 0))  # the doctor's: 1 after a FATAL finding


if __name__ == "__main__":
    sys.exit(main())
