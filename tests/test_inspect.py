"""`policyopt inspect`: what a GRPO run records per step, and the page drawn from it.

Tiny GRPO runs (a model of a few thousand parameters built in the run): recording leaves training bit
for bit as it is, a resumed run never holds a step twice, the page shows the recorded numbers (checked
against numbers recomputed here from the run's checkpoints and reward function), fetches nothing, and
opens in headless Chromium without a console message.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from policyopt.cli import main
from policyopt.inspector.record import RECORDS_FILE, InspectConfig, chosen_groups, is_recorded, read_records
from policyopt.recipes.grpo import GRPOConfig, run_grpo
from policyopt.runtime.config import config_from_dict
from policyopt.runtime.metrics import read_metrics

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
TIMING_KEYS = {"seconds_per_step", "generation_seconds", "tokens_per_second"}  # wall time, differs run to run
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rewards") / "inspect_rewards.py"
    # a random tiny model's answers differ in this often, so most groups have reward spread
    path.write_text(textwrap.dedent("""
        def has_digit(prompts, completions, **columns):
            return [1.0 if any(ch.isdigit() for ch in c) else 0.0 for c in completions]
    """))
    return f"{path}:has_digit"


def _run(out: Path, reward: str, **overrides) -> Path:
    data = {"output_dir": str(out), "steps": 3, "prompts_per_step": 4, "group_size": 4, "eval_every": 0,
            "tensorboard": False, "optim": {"lr": 1e-2, "warmup_steps": 0},
            "sampling": {"max_new_tokens": 6, "temperature": TEMPERATURE}, "data": {"eval_size": 8},
            "model": {"tiny": TINY}, "rewards": [{"function": reward}, {"function": "format", "weight": 0.1}]}
    data.update(overrides)
    run_grpo(config_from_dict(GRPOConfig, data))
    return out


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, reward_file) -> Path:
    """beta > 0 (a reference model), two passes over two minibatches, a checkpoint after every step."""
    return _run(tmp_path_factory.mktemp("inspect") / "run", reward_file, beta=0.05, update_epochs=2,
                num_minibatches=2, save_every=1, keep_last=3, inspect={"groups": 2})


def test_recording_does_not_change_training(tmp_path, reward_file):
    """Inspect on and off: the same final weights, metrics and global RNG states, bit for bit."""
    states = {}
    for name, groups in (("on", 2), ("off", 0)):
        _run(tmp_path / name, reward_file, beta=0.05, update_epochs=2, num_minibatches=2,
             inspect={"groups": groups, "every": 1})
        states[name] = torch.get_rng_state()
    on, off = tmp_path / "on", tmp_path / "off"
    assert len(read_records(on / RECORDS_FILE)) == 3 * 2  # 3 steps x 2 groups were recorded...
    assert not (off / RECORDS_FILE).exists() or not read_records(off / RECORDS_FILE)
    weights_on = load_file(str(on / "final" / "model.safetensors"))
    weights_off = load_file(str(off / "final" / "model.safetensors"))
    assert weights_on.keys() == weights_off.keys()
    for key in weights_on:  # ...and training is exactly the same
        assert torch.equal(weights_on[key], weights_off[key]), key
    strip = (lambda records: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records])
    assert strip(read_metrics(on / "metrics.jsonl")) == strip(read_metrics(off / "metrics.jsonl"))
    assert torch.equal(states["on"], states["off"])  # no draw from the global torch generator


def test_which_steps_and_groups_are_recorded():
    auto = InspectConfig()
    recorded = [s for s in range(1, 401) if is_recorded(s, auto, 400)]
    assert len(recorded) == 101 and recorded[:3] == [1, 5, 9] and recorded[-2:] == [397, 400]
    assert not any(is_recorded(s, InspectConfig(groups=0), 400) for s in range(1, 401))
    assert [s for s in range(1, 8) if is_recorded(s, InspectConfig(every=3), 7)] == [1, 4, 7]
    # groups 0 and 2 have equal rewards: the ones with spread come first, from (step - 1) mod 4
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    assert chosen_groups(rewards, 2, 2, step=1) == [1, 3]
    assert chosen_groups(rewards, 2, 4, step=4) == [3, 1, 0, 2]


def test_resume_drops_the_records_after_its_checkpoint(tmp_path, reward_file):
    out = _run(tmp_path / "run", reward_file, steps=4, save_every=2, keep_last=2, inspect={"every": 1})
    uninterrupted = read_records(out / RECORDS_FILE)
    assert [r["step"] for r in uninterrupted] == [1, 2, 3, 4]
    with (out / RECORDS_FILE).open("a") as f:
        f.write('{"step": 4, "recipe": "grpo", "answ')  # a record torn by a kill mid-write
    # resume from step 2: steps 3 and 4 run again, and their records replace the old ones
    _run(out, reward_file, steps=4, save_every=2, keep_last=2, inspect={"every": 1},
         resume=str(out / "checkpoints" / "step-000002"))
    resumed = read_records(out / RECORDS_FILE)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed == uninterrupted  # exact resume: the re-run steps record the same numbers


class _Tables(HTMLParser):
    """The text of each cell of each <table>, row by row (entities decoded, whitespace kept)."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _logprobs(model_dir: Path, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """log pi(answer_t | prompt, answer_<t) at the run's temperature, straight from transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1].double() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(answer_ids)[:, None])[:, 0]


def test_page_shows_the_recorded_numbers(recorded_run, reward_file, capsys):
    assert main(["inspect", str(recorded_run), "--step", "2"]) == 0
    page_path = recorded_run / "inspect" / "step-2.html"
    assert str(page_path) in capsys.readouterr().out
    page = page_path.read_text()
    records = [r for r in read_records(recorded_run / RECORDS_FILE) if r["step"] == 2]
    assert len(records) == 2  # inspect.groups=2: both groups are on the page
    record = records[0]

    # the group table holds the recorded answers, per-function rewards, totals and advantages
    group_tables = [t for t in _parsed(page) if t[0][:2] == ["#", "answer (decoded, as the rewards read it)"]]
    rows = group_tables[0][1:]
    assert len(rows) == 4
    for row, answer in zip(rows, record["answers"]):
        assert row[1] == answer["text"]
        assert row[2:4] == [f"{v:.3f}" for v in answer["rewards"]]
        assert row[4] == f"{answer['reward']:.3f}" and row[5] == f"{answer['advantage']:.3f}"

    # the recorded rewards are the reward function's, and the advantages follow from them (GRPO's formula)
    from policyopt.rewards.combine import RewardSpec

    _, has_digit, _ = RewardSpec(reward_file).load()
    texts = [a["text"] for a in record["answers"]]
    assert [a["rewards"][0] for a in record["answers"]] == has_digit([record["prompt"]] * 4, texts)
    totals = torch.tensor([a["reward"] for a in record["answers"]], dtype=torch.float64)
    expected = (totals - totals.mean()) / (totals.std() + 1e-4)  # advantage_eps = 1e-4
    for answer, value in zip(record["answers"], expected.tolist()):
        # 4 significant digits are stored: 5e-4 relative, and an absolute floor for values near 0
        assert answer["advantage"] == pytest.approx(value, rel=5e-4, abs=1e-6)
    assert f"{record['reward_mean']:.3f}" in page and f"{record['reward_std']:.3f}" in page

    # the ratio is pi_theta after step 2 over pi_old before it: recompute both from the checkpoints
    answer = max(record["answers"], key=lambda a: len(a["ids"]))
    old = _logprobs(recorded_run / "checkpoints" / "step-000001", record["prompt_ids"], answer["ids"])
    new = _logprobs(recorded_run / "checkpoints" / "step-000002", record["prompt_ids"], answer["ids"])
    recomputed = (new - old).tolist()
    assert any(abs(x) > 1e-4 for x in recomputed)  # the update moved these tokens: the check has teeth
    for got, want in zip(answer["log_ratio"], recomputed):
        # stored to 4 significant digits (5e-4 relative); float32 forwards in two layouts differ by ~1e-6
        assert got == pytest.approx(want, rel=5e-4, abs=1e-5)
    for lp, want in zip(answer["logp_old"], old.tolist()):
        assert lp == pytest.approx(want, rel=5e-4, abs=1e-5)
    i = record["answers"].index(answer)
    tip = f"r = pi_theta/pi_old = {math.exp(answer['log_ratio'][0]):.4g}"
    assert html.escape(f"answer {i}, token 0: ", quote=True) in page and tip in page

    # beta > 0: KL per token is shown; the next-token tables have a pi_ref column of numbers
    assert "KL term to the reference" in page and "Absent" not in page
    assert all(len(a["kl"]) == len(a["ids"]) for a in record["answers"])
    dist_tables = [t for t in _parsed(page) if t[0] == ["next token", "πold", "πθ after update", "πref"]]
    assert len(dist_tables) == 2 * 4  # 4 positions per group
    assert all(re.fullmatch(r"[0-9.]+|< [0-9.]+", row[3]) for t in dist_tables for row in t[1:])

    assert not re.search(r"https?://", page), "the page must not reference any network resource"
    assert "<link" not in page and "src=" not in page


def _parsed(page: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def test_beta_zero_says_the_kl_is_absent(tmp_path, reward_file):
    out = _run(tmp_path / "run", reward_file, steps=1, beta=0.0)
    assert main(["inspect", str(out), "--output", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    assert "Absent: &beta; = 0" in page and "no &pi;<sub>ref</sub>" in page
    assert all("kl" not in a for a in read_records(out / RECORDS_FILE)[0]["answers"])


def test_errors_name_the_path_and_the_recorded_steps(tmp_path, recorded_run, capsys):
    def error(*args) -> str:
        assert main(["inspect", *map(str, args)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("policyopt inspect: error: ") and "\n" not in err
        return err

    assert "no such run directory" in error(tmp_path / "missing")
    message = error(recorded_run, "--step", 7)
    assert "step 7 was not recorded; recorded steps: 1, 2, 3 (3 steps)" in message and str(recorded_run) in message
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    (ppo / "config.yaml").write_text("output_dir: x\nvalue_model: shared\n")
    assert f"{ppo} is a PPO run" in error(ppo)
    grpo = tmp_path / "grpo_off"
    grpo.mkdir()
    (grpo / "config.yaml").write_text("output_dir: x\nadvantage_estimator: grpo\n")
    assert "inspect.groups=0" in error(grpo) and str(grpo / RECORDS_FILE) in error(grpo)
    assert f"these runs inside it do: {recorded_run}" in error(recorded_run.parent)


def test_inspect_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for part in ("RUN_DIR", "--step", "--output", "pi_old", "inspect.groups"):
        assert part in text, part


CLICK_CHECK = """<script>
var chip = document.querySelector('.tok.has-dist');
chip.click();
var flashed = document.querySelector('.dist.flash');
console.log('inspect-click ' + chip.dataset.pos + ' -> ' + (flashed ? flashed.id : 'none'));
</script></body>"""


def _chromium(page: Path, screenshot: Path) -> list[str]:
    """Open ``page`` headless; the console lines Chromium logged for it (errors, uncaught exceptions, logs)."""
    result = subprocess.run(
        ["chromium", "--headless=new", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
         f"--screenshot={screenshot}", "--window-size=1200,3000", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
def test_page_opens_in_headless_chromium_without_console_messages(recorded_run, tmp_path):
    page = tmp_path / "page.html"
    assert main(["inspect", str(recorded_run), "--output", str(page)]) == 0
    screenshot = tmp_path / "page.png"
    assert _chromium(page, screenshot) == []  # the page itself logs nothing: no error, no exception
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a drawn page, not a blank one
    # the one script: clicking a token that has a distribution table flashes that table
    clicked = tmp_path / "clicked.html"
    clicked.write_text(page.read_text().replace("</body>", CLICK_CHECK))
    lines = _chromium(clicked, tmp_path / "clicked.png")
    assert len(lines) == 1 and re.search(r"inspect-click (\d+-\d+) -> pos-\1", lines[0]), lines
