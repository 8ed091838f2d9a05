import math
import textwrap

import numpy as np
import pytest
import torch

from policyopt.rewards.builtin import (
    BUILTIN_REWARDS,
    accuracy_reward,
    extract_answer,
    format_reward,
)
from policyopt.rewards.combine import (
    RewardError,
    RewardScores,
    RewardSpec,
    load_reward_function,
    score_completions,
)

# ---------------------------------------------------------------- built-in rewards


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer> 14 </answer>", "14"),
        ("think <answer>1</answer> then <answer>2</answer> done", "2"),
        ("no tags at all", None),
        ("<answer>unclosed", None),
        ("closed only</answer>", None),
        ("<answer>\n3\n</answer>", "3"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_accuracy_reward():
    completions = [
        "<answer>19</answer>",
        "<answer>19.0</answer>",
        "<answer> 19 </answer>",
        "<answer>18</answer>",
        "19",
        "<answer>abc</answer>",
        "<answer>abc</answer>",
        "<answer>7</answer>",
    ]
    answers = ["19", "19", "19", "19", "19", " abc ", "abd", None]
    assert accuracy_reward(["p"] * 8, completions, answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, None]


def test_accuracy_reward_chat_completions_and_numeric_truth():
    completions = [
        [{"role": "assistant", "content": "<answer>-5</answer>"}],
        [{"role": "assistant", "content": "<answer>4</answer>"}],
    ]
    assert accuracy_reward(prompts=["a", "b"], completions=completions, answer=[-5, "5"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>14</answer>", 1.0),
        ("  <answer>14</answer>\n", 1.0),
        ("The answer is <answer>14</answer>", 0.0),
        ("<answer>14</answer> done", 0.0),
        ("<answer><answer>14</answer></answer>", 0.0),
        ("<answer><answer>14</answer>", 0.0),
        ("<answer>14</answer></answer>", 0.0),
        ("<answer>1</answer><answer>2</answer>", 0.0),
        ("<answer>  </answer>", 0.0),
        ("14", 0.0),
        ([{"role": "assistant", "content": "<answer>3</answer>"}], 1.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(["p"], [completion]) == [expected]


def test_builtin_registry():
    assert set(BUILTIN_REWARDS) == {"accuracy", "format", "code", "code_all", "language"}
    assert BUILTIN_REWARDS["accuracy"] is accuracy_reward and BUILTIN_REWARDS["format"] is format_reward
    assert BUILTIN_REWARDS["code"](None, ["def f():\n    return 1"], ["assert f() == 1"]) == [1.0]


# ---------------------------------------------------------------- loading reward functions


def write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_load_builtin():
    assert load_reward_function("accuracy") is accuracy_reward
    assert load_reward_function("format") is format_reward


def test_load_unknown_name():
    with pytest.raises(RewardError, match="unknown reward 'acc'.*accuracy, format"):
        load_reward_function("acc")


def test_load_user_function(tmp_path):
    path = write(
        tmp_path,
        "my_rewards.py",
        """
        def length_reward(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]
        """,
    )
    f = load_reward_function(f"{path}:length_reward")
    assert f(prompts=["a", "b"], completions=["xy", "xyz"]) == [2.0, 3.0]


def test_same_file_name_in_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pa = write(tmp_path / "a", "r.py", "def f(prompts, completions, **kw): return [1.0]\n")
    pb = write(tmp_path / "b", "r.py", "def f(prompts, completions, **kw): return [2.0]\n")
    assert load_reward_function(f"{pa}:f")([], []) == [1.0]
    assert load_reward_function(f"{pb}:f")([], []) == [2.0]


def test_load_missing_file(tmp_path):
    with pytest.raises(RewardError, match=r"missing\.py: no such file"):
        load_reward_function(f"{tmp_path}/missing.py:f")


def test_load_syntax_error(tmp_path):
    path = write(tmp_path, "broken.py", "def f(:\n    pass\n")
    with pytest.raises(RewardError, match=r"broken\.py failed to import: SyntaxError") as info:
        load_reward_function(f"{path}:f")
    assert isinstance(info.value.__cause__, SyntaxError)


def test_load_import_error(tmp_path):
    path = write(tmp_path, "raises.py", "import not_a_real_module_xyz\n")
    with pytest.raises(RewardError, match=r"raises\.py failed to import: ModuleNotFoundError.*not_a_real_module_xyz"):
        load_reward_function(f"{path}:f")


def test_load_function_not_found_lists_callables(tmp_path):
    path = write(
        tmp_path,
        "several.py",
        """
        from os.path import join
        LIMIT = 3
        def helper(x): return x
        def other_reward(prompts, completions, **kw): return [0.0] * len(prompts)
        class Scorer: pass
        """,
    )
    with pytest.raises(RewardError) as info:
        load_reward_function(f"{path}:my_reward")
    message = str(info.value)
    assert "several.py has no function 'my_reward'" in message
    assert "Scorer, helper, other_reward" in message
    assert "join" not in message


def test_load_not_callable(tmp_path):
    path = write(tmp_path, "value.py", "LIMIT = 3\n")
    with pytest.raises(RewardError, match="value.py:LIMIT is a int, not a function"):
        load_reward_function(f"{path}:LIMIT")


def test_reward_spec(tmp_path):
    path = write(tmp_path, "r.py", "def mine(prompts, completions, **kw): return [1.0]\n")
    assert RewardSpec("accuracy").name == "accuracy"
    assert RewardSpec(f"{path}:mine").name == "mine"
    assert RewardSpec("format", weight=0.5, name="fmt").name == "fmt"
    name, f, weight = RewardSpec(f"{path}:mine", weight=2).load()
    assert (name, f([], []), weight) == ("mine", [1.0], 2.0)


# ---------------------------------------------------------------- score_completions


def constant(values):
    def f(prompts, completions, **kwargs):
        return list(values)

    return f


PROMPTS = ["p0", "p1", "p2", "p3"]
COMPLETIONS = ["c0", "c1", "c2", "c3"]


def nan_equal(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_score_weights_and_none():
    scores = score_completions(
        [("a", constant([1, None, 0.5, None]), 2.0), ("b", constant([0.0, 2.0, None, None]), 0.5)],
        PROMPTS,
        COMPLETIONS,
        {},
    )
    assert isinstance(scores, RewardScores)
    assert scores.names == ["a", "b"]
    assert scores.per_function.dtype == torch.float32 and scores.per_function.shape == (4, 2)
    nan = float("nan")
    assert nan_equal(scores.per_function, torch.tensor([[1.0, 0.0], [nan, 2.0], [0.5, nan], [nan, nan]]))
    assert nan_equal(scores.total, torch.tensor([2.0, 1.0, 1.0, nan]))
    assert scores.num_failed == 0


def test_score_passes_columns_and_arguments():
    seen = {}

    def f(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, extra=kwargs)
        return [1.0] * len(prompts)

    score_completions([("f", f, 1.0)], PROMPTS, COMPLETIONS, {"answer": list("abcd"), "id": [1, 2, 3, 4]})
    assert seen == {
        "prompts": PROMPTS,
        "completions": COMPLETIONS,
        "answer": list("abcd"),
        "extra": {"id": [1, 2, 3, 4]},
    }


def test_score_builtins_end_to_end():
    completions = ["<answer>3</answer>", "so <answer>3</answer>", "<answer>4</answer>", "3"]
    scores = score_completions(
        [("accuracy", accuracy_reward, 1.0), ("format", format_reward, 0.1)],
        PROMPTS,
        completions,
        {"answer": ["3", "3", "3", None]},
    )
    assert scores.total.tolist() == pytest.approx([1.1, 1.0, 0.1, 0.0])


def test_score_accepts_number_types():
    values = (True, np.float32(0.5), np.int64(2), np.bool_(False))
    scores = score_completions([("t", constant(values), 1.0)], PROMPTS, COMPLETIONS, {})
    assert scores.total.tolist() == [1.0, 0.5, 2.0, 0.0]
    scores = score_completions(
        [("arr", lambda **kw: np.array([1.0, 2.0, 3.0, 4.0]), 1.0)], PROMPTS, COMPLETIONS, {}
    )
    assert scores.total.tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    "bad, shown",
    [(float("nan"), "nan"), (float("inf"), "inf"), ("1.0", "'1.0'"), ([1.0], r"\[1.0\]"), (1 + 2j, r"\(1\+2j\)")],
)
def test_score_bad_value(bad, shown):
    with pytest.raises(RewardError, match=rf"'acc' returned {shown} for sample 2 \(prompt 'p2'\)"):
        score_completions([("acc", constant([1.0, 0.0, bad, 1.0]), 1.0)], PROMPTS, COMPLETIONS, {})


def test_score_error_truncates_prompt():
    prompts = ["x" * 500]
    with pytest.raises(RewardError) as info:
        score_completions([("f", constant([math.nan]), 1.0)], prompts, ["c"], {})
    message = str(info.value)
    assert "'" + "x" * 76 + "..." in message and "x" * 77 not in message


def test_score_wrong_length():
    with pytest.raises(RewardError, match="'short' must return a list of 4 values, got 3 values"):
        score_completions([("short", constant([1.0, 1.0, 1.0]), 1.0)], PROMPTS, COMPLETIONS, {})
    with pytest.raises(RewardError, match="'scalar' must return a list of 4 values, got float"):
        score_completions([("scalar", lambda **kw: 1.0, 1.0)], PROMPTS, COMPLETIONS, {})


def test_score_function_raises():
    def broken(prompts, completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RewardError, match="'broken' raised KeyError: 'answer'") as info:
        score_completions([("broken", broken, 1.0)], PROMPTS, COMPLETIONS, {})
    assert isinstance(info.value.__cause__, KeyError)


def test_score_skip_mode():
    def broken(prompts, completions, **kwargs):
        raise RuntimeError("boom")

    scores = score_completions(
        [
            ("ok", constant([1.0, 1.0, 1.0, None]), 1.0),
            ("broken", broken, 1.0),
            ("bad", constant([2.0, math.inf, "x", 2.0]), 1.0),
            ("short", constant([5.0]), 1.0),
        ],
        PROMPTS,
        COMPLETIONS,
        {},
        on_error="skip",
    )
    assert scores.num_failed == 4 + 2 + 4
    assert scores.per_function[:, 1].isnan().all() and scores.per_function[:, 3].isnan().all()
    assert nan_equal(scores.per_function[:, 2], torch.tensor([2.0, math.nan, math.nan, 2.0]))
    assert nan_equal(scores.total, torch.tensor([3.0, 1.0, 1.0, 2.0]))


def test_score_argument_checks():
    with pytest.raises(ValueError, match="on_error"):
        score_completions([("a", constant([1.0] * 4), 1.0)], PROMPTS, COMPLETIONS, {}, on_error="ignore")
    with pytest.raises(ValueError, match="at least one"):
        score_completions([], PROMPTS, COMPLETIONS, {})
    with pytest.raises(ValueError, match="column 'answer' has 2 values, expected 4"):
        score_completions([("a", constant([1.0] * 4), 1.0)], PROMPTS, COMPLETIONS, {"answer": [1, 2]})
