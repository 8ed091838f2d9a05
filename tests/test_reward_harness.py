"""The reward harness: deadlines, crashes and None, for any reward function, in the trainer or in workers.

Every hostile function here would, without the harness, hang the trainer, kill it, or train on nothing.
"""

import logging
import math
import signal
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest

from policyopt.rewards.combine import RewardError, score_completions
from policyopt.rewards.harness import RewardHarness
from host_processes import processes_with

PROMPTS = ["p0", "p1", "p2", "p3"]
MARKER = f"policyopt-harness-{uuid.uuid4().hex}"

FUNCTIONS = textwrap.dedent(f"""
    import ctypes, os, signal, subprocess, time
    import numpy as np

    def length(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    def as_array(prompts, completions, **kw):
        return np.array([float(len(c)) for c in completions])

    def zero_or_none(prompts, completions, **kw):
        return [None if c == "none" else 0.0 for c in completions]

    def nothing(prompts, completions, **kw):
        return [None for c in completions]

    def hangs(prompts, completions, **kw):
        if "hang" in completions:
            time.sleep(60)
        return [1.0 for c in completions]

    def hangs_and_swallows(prompts, completions, **kw):
        try:
            time.sleep(60)
        except Exception:  # a function's own blanket except must not swallow the deadline
            pass
        return [1.0 for c in completions]

    def hangs_with_a_child(prompts, completions, **kw):
        subprocess.Popen(["sleep", "300", "{MARKER}"])
        time.sleep(60)

    def segfaults(prompts, completions, **kw):
        if "boom" in completions:
            ctypes.string_at(0)
        return [1.0 for c in completions]

    def exits(prompts, completions, **kw):
        os._exit(3)

    def raises_on_bad(prompts, completions, **kw):
        if "bad" in completions:
            raise ValueError("cannot parse")
        return [1.0 for c in completions]

    def fails_in_batches(prompts, completions, **kw):
        if len(completions) > 1:
            raise ConnectionError("judge overloaded")
        return [0.5]

    def uses_alarm(prompts, completions, **kw):  # as math_verify does
        def late(signum, frame):
            raise TimeoutError
        signal.signal(signal.SIGALRM, late)
        signal.alarm(5)
        try:
            return [0.25 for c in completions]
        finally:
            signal.alarm(0)
""")


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "functions.py"
    path.write_text(FUNCTIONS)
    return path


def spec(rewards_file, name):
    return (name, f"{rewards_file}:{name}", 1.0)


# ------------------------------------------------------------------ score 0 is not "could not score"


def test_zero_and_none_stay_apart(rewards_file):
    with RewardHarness([spec(rewards_file, "zero_or_none")]) as harness:
        scores = harness.score(PROMPTS, ["a", "none", "b", "none"], {})
    column = scores.per_function[:, 0]
    assert column[0] == 0.0 and column[2] == 0.0
    assert math.isnan(column[1]) and math.isnan(column[3])
    assert math.isnan(scores.total[1]) and scores.total[0] == 0.0  # no function applied: NaN, not 0
    assert scores.num_failed == 0


def test_a_function_that_never_scores_warns_then_stops_the_run(rewards_file, caplog):
    with RewardHarness([spec(rewards_file, "nothing"), spec(rewards_file, "length")],
                       max_unscored_batches=3) as harness:
        with caplog.at_level(logging.WARNING, logger="policyopt.rewards.harness"):
            harness.score(PROMPTS, PROMPTS, {})
        assert "reward function 'nothing' could not score any of the 4 samples of this training batch" in caplog.text
        harness.score(PROMPTS, PROMPTS, {})
        for _ in range(5):  # evaluation batches neither count nor reset the streak
            harness.score(PROMPTS, PROMPTS, {}, training=False)
        with pytest.raises(RewardError, match=r"'nothing' returned None \(could not score\) for every sample of 3 "
                                              r"training batches in a row.*reward_max_unscored_batches"):
            harness.score(PROMPTS, PROMPTS, {"answer": [None] * 4})


def test_a_batch_it_scores_resets_the_count_and_zero_never_stops(rewards_file):
    with RewardHarness([spec(rewards_file, "zero_or_none")], max_unscored_batches=2) as harness:
        for _ in range(4):
            harness.score(PROMPTS, ["none"] * 4, {})  # nothing scored
            harness.score(PROMPTS, ["none", "none", "none", "x"], {})  # one sample scored (0.0): resets
    with RewardHarness([spec(rewards_file, "nothing")], max_unscored_batches=0) as harness:
        for _ in range(5):
            harness.score(PROMPTS, PROMPTS, {})  # 0: warn, never stop


# ------------------------------------------------------------------ in the trainer's process


def test_in_process_timeout_names_the_function_and_the_sample(rewards_file):
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"reward function 'hangs' timed out after 0.3s \(reward_timeout\) "
                                          r"on sample 2 of 4 \(prompt 'p2'\)"):
        score_completions([spec(rewards_file, "hangs")], PROMPTS, ["a", "b", "hang", "c"], {}, timeout=0.3)
    assert time.monotonic() - start < 5  # the batch call and the retries, not the 60 s sleep


def test_in_process_timeout_is_not_swallowed_by_the_function(rewards_file):
    with pytest.raises(RewardError, match="'hangs_and_swallows' timed out"):
        score_completions([spec(rewards_file, "hangs_and_swallows")], ["p"], ["c"], {}, timeout=0.2)


def test_in_process_timeout_gives_back_an_earlier_alarm(rewards_file):
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(True))
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        score_completions([spec(rewards_file, "length")], PROMPTS, PROMPTS, {}, timeout=5.0)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0 and signal.getsignal(signal.SIGALRM) is not None and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_skip_scores_only_the_failing_sample_as_missing(rewards_file):
    scores = score_completions([spec(rewards_file, "raises_on_bad")], PROMPTS, ["a", "bad", "b", "c"], {},
                               on_error="skip")
    assert scores.num_failed == 1
    assert scores.per_function[:, 0].tolist()[0] == 1.0 and math.isnan(scores.per_function[1, 0])
    with pytest.raises(RewardError, match=r"'raises_on_bad' raised ValueError: cannot parse on sample 1 of 4 "
                                          r"\(prompt 'p1'\)"):
        score_completions([spec(rewards_file, "raises_on_bad")], PROMPTS, ["a", "bad", "b", "c"], {})


def test_a_failure_only_in_batches_is_named_so(rewards_file):
    with pytest.raises(RewardError, match=r"'fails_in_batches' raised ConnectionError: judge overloaded on a batch "
                                          r"of 4 samples, but each sample scored when called alone"):
        score_completions([spec(rewards_file, "fails_in_batches")], PROMPTS, PROMPTS, {})
    scores = score_completions([spec(rewards_file, "fails_in_batches")], PROMPTS, PROMPTS, {}, on_error="skip")
    assert scores.per_function[:, 0].tolist() == [0.5] * 4 and scores.num_failed == 0


def test_off_the_main_thread_no_deadline_is_pretended(rewards_file, caplog):
    """Signals reach only the main thread: in-process, a timeout there cannot hold, and the log says so;
    a function using signal.alarm fails there (as math_verify does), by name, not silently scoring 0."""
    outcome = {}

    def score():
        harness = RewardHarness([spec(rewards_file, "length")], timeout=5.0)
        outcome["length"] = harness.score(PROMPTS, PROMPTS, {}).per_function[:, 0].tolist()
        try:
            score_completions([spec(rewards_file, "uses_alarm")], PROMPTS, PROMPTS, {})
        except RewardError as e:
            outcome["alarm"] = str(e)

    with caplog.at_level(logging.WARNING, logger="policyopt.rewards.harness"):
        thread = threading.Thread(target=score)
        thread.start()
        thread.join(30)
    assert outcome["length"] == [2.0] * 4
    assert "reward_timeout=5s is not enforced" in caplog.text and "reward_workers" in caplog.text
    assert "'uses_alarm' raised ValueError: signal only works in main thread" in outcome["alarm"]


# ------------------------------------------------------------------ in worker processes


def test_workers_score_what_the_trainer_would(rewards_file):
    functions = [spec(rewards_file, "length"), spec(rewards_file, "as_array"), spec(rewards_file, "zero_or_none")]
    completions = ["a", "bb", "none", "dddd"]
    with RewardHarness(functions, workers=2) as workers, RewardHarness(functions) as here:
        remote, local = workers.score(PROMPTS, completions, {}), here.score(PROMPTS, completions, {})
    assert np.array_equal(remote.per_function.numpy(), local.per_function.numpy(), equal_nan=True)
    assert np.array_equal(remote.total.numpy(), local.total.numpy(), equal_nan=True)


def test_a_segfault_in_a_worker_is_one_missing_sample(rewards_file):
    with RewardHarness([spec(rewards_file, "segfaults"), spec(rewards_file, "length")], workers=1,
                       on_error="skip") as harness:
        scores = harness.score(PROMPTS, ["a", "boom", "b", "c"], {})
        assert scores.num_failed == 1 and math.isnan(scores.per_function[1, 0])
        assert scores.per_function[[0, 2, 3], 0].tolist() == [1.0] * 3
        assert scores.per_function[:, 1].tolist() == [1.0, 4.0, 1.0, 1.0]
        again = harness.score(PROMPTS, ["a", "b", "c", "d"], {})  # a fresh worker took the dead one's place
        assert again.per_function[:, 0].tolist() == [1.0] * 4
    with RewardHarness([spec(rewards_file, "segfaults")], workers=1) as harness:
        with pytest.raises(RewardError, match=r"'segfaults' crashed \(the worker was killed by SIGSEGV\) on sample 1 "
                                              r"of 4 \(prompt 'p1'\)"):
            harness.score(PROMPTS, ["a", "boom", "b", "c"], {})


def test_a_hung_worker_is_killed_with_what_it_started(rewards_file):
    with RewardHarness([spec(rewards_file, "hangs_with_a_child")], workers=1, timeout=0.5) as harness:
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"'hangs_with_a_child' timed out after 0.5s \(reward_timeout\) on "
                                              r"sample 0 of 2"):
            harness.score(["p0", "p1"], ["a", "b"], {})
        assert time.monotonic() - start < 10
        deadline = time.monotonic() + 5
        while processes_with(MARKER) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(MARKER) == [], "a process the reward function started outlived its worker"
    with RewardHarness([spec(rewards_file, "hangs"), spec(rewards_file, "length")], workers=2, timeout=0.5,
                       on_error="skip") as harness:
        scores = harness.score(PROMPTS, ["a", "b", "c", "hang"], {})  # the hung sample last: the rest keep scores
        assert scores.per_function[:3, 0].tolist() == [1.0] * 3 and math.isnan(scores.per_function[3, 0])
        assert scores.per_function[:, 1].tolist() == [1.0, 1.0, 1.0, 4.0]


def test_a_worker_that_exits_is_replaced(rewards_file):
    with RewardHarness([spec(rewards_file, "exits"), spec(rewards_file, "length")], workers=1,
                       on_error="skip") as harness:
        for _ in range(2):
            scores = harness.score(["p0"], ["a"], {})
            assert math.isnan(scores.per_function[0, 0]) and scores.per_function[0, 1] == 1.0
    with pytest.raises(RewardError, match=r"'exits' crashed \(the worker exited with status 3\)"):
        with RewardHarness([spec(rewards_file, "exits")], workers=1) as harness:
            harness.score(["p0"], ["a"], {})


def test_signal_alarm_works_in_a_worker_even_from_a_thread(rewards_file):
    outcome = {}

    def score():
        with RewardHarness([spec(rewards_file, "uses_alarm")], workers=1, timeout=5.0) as harness:
            outcome["scores"] = harness.score(PROMPTS, PROMPTS, {}).per_function[:, 0].tolist()

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(60)
    assert outcome["scores"] == [0.25] * 4


def test_what_a_worker_cannot_load_is_a_reward_error(rewards_file):
    with pytest.raises(RewardError, match=r"in a reward worker process: reward file .*functions.py has no function "
                                          r"'absent'"):
        RewardHarness([spec(rewards_file, "absent")], workers=1)
    with pytest.raises(RewardError, match=r"'inline' cannot be sent to a worker process.*path/to/file.py:function"):
        RewardHarness([("inline", lambda prompts, completions, **kw: [1.0] * len(completions), 1.0)], workers=1)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="on_error"):
        RewardHarness([], on_error="ignore")
    with pytest.raises(ValueError, match=">= 0"):
        RewardHarness([], timeout=-1)
