"""Preference data: pairs and rankings from files, grouping per prompt, and the built-in labeller."""

import json
import random

import pytest

from policyopt.data.arithmetic import ArithmeticTask, completion_for
from policyopt.data.loading import DataError
from policyopt.data.preferences import (
    BuiltinPreferenceConfig,
    PreferenceColumns,
    count_pairs,
    groups_from_rows,
    load_preference_groups,
    split_groups,
    write_groups,
)
from policyopt.rollout.preferences import builtin_preferences, corrupt_answer, is_correct, label_group


def _pairs_as_text(group):
    return [(group.answers[b], group.answers[w], m) for b, w, m in group.pairs]


def test_pairs_with_margins_are_grouped_per_prompt():
    rows = [
        {"prompt": "q1", "chosen": "a", "rejected": "b", "margin": 0.5},
        {"prompt": "q2", "chosen": "x", "rejected": "y"},
        {"prompt": "q1", "chosen": "a", "rejected": "c"},  # same prompt, shared answer "a"
    ]
    groups = groups_from_rows(rows)
    assert [g.prompt for g in groups] == ["q1", "q2"]
    assert groups[0].answers == ["a", "b", "c"]
    assert _pairs_as_text(groups[0]) == [("a", "b", 0.5), ("a", "c", 0.0)]
    assert _pairs_as_text(groups[1]) == [("x", "y", 0.0)]


def test_a_ranking_expands_into_all_ordered_pairs():
    groups = groups_from_rows([{"prompt": "q", "answers": ["best", "mid", "low", "worst"]}])
    pairs = _pairs_as_text(groups[0])
    assert len(pairs) == 4 * 3 // 2
    assert {(b, w) for b, w, _ in pairs} == {("best", "mid"), ("best", "low"), ("best", "worst"),
                                             ("mid", "low"), ("mid", "worst"), ("low", "worst")}


def test_chat_messages_and_custom_columns():
    rows = [{"question": [{"role": "user", "content": "hi"}],
             "good": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}],
             "bad": [{"role": "assistant", "content": "go away"}]}]
    columns = PreferenceColumns(prompt="question", chosen="good", rejected="bad")
    groups = groups_from_rows([{"prompt": r["question"], **r} for r in rows], columns)
    assert groups[0].prompt == [{"role": "user", "content": "hi"}]
    assert _pairs_as_text(groups[0]) == [("hello!", "go away", 0.0)]


def test_bad_rows_fail_with_their_location(caplog):
    with pytest.raises(DataError, match="row 1.*both"):
        groups_from_rows([{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match="at least 2"):
        groups_from_rows([{"prompt": "q", "answers": ["only"]}])
    with pytest.raises(DataError, match="same answer twice"):
        groups_from_rows([{"prompt": "q", "answers": ["a", "a"]}])
    with pytest.raises(DataError, match="margin"):
        groups_from_rows([{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}])
    with pytest.raises(DataError, match="row 2.*pair.*ranking"):
        groups_from_rows([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "text": "?"}])
    with pytest.raises(DataError, match="non-empty"):
        groups_from_rows([{"prompt": "q", "chosen": "", "rejected": "b"}])
    # a pair whose two answers are identical carries no preference: skipped, and said so
    groups = groups_from_rows([{"prompt": "q", "chosen": "a", "rejected": "a"},
                               {"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert count_pairs(groups) == 1 and "identical" in caplog.text
    with pytest.raises(DataError, match="no usable"):
        groups_from_rows([{"prompt": "q", "chosen": "a", "rejected": "a"}])


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf"])
def test_files_of_every_kind(tmp_path, kind):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    rows.append({"prompt": "r", "answers": ["1", "2", "3"]})
    if kind == "jsonl":
        path = tmp_path / "prefs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "prefs.parquet"
        # one table, one schema: the columns a row does not use are null
        table = pa.Table.from_pylist([{"answers": None, "chosen": None, "rejected": None, **r} for r in rows])
        pq.write_table(table, path)
    else:
        import datasets

        path = tmp_path / "prefs_hf"
        datasets.Dataset.from_list([{"answers": None, "chosen": None, "rejected": None, **r} for r in rows]
                                   ).save_to_disk(str(path))
    groups = load_preference_groups(str(path))
    assert len(groups) == 6 and count_pairs(groups) == 5 + 3


def test_written_groups_read_back_the_same(tmp_path):
    groups = groups_from_rows([{"prompt": "q", "answers": ["a", "b", "c"]},
                               {"prompt": [{"role": "user", "content": "p"}], "chosen": "x", "rejected": "y",
                                "margin": 1.5}])
    write_groups(groups, tmp_path / "g.jsonl")
    again = load_preference_groups(str(tmp_path / "g.jsonl"))
    assert [(g.prompt, g.answers, g.pairs) for g in again] == [(g.prompt, g.answers, g.pairs) for g in groups]


def test_split_keeps_each_prompt_whole():
    groups = groups_from_rows([{"prompt": f"q{i}", "answers": ["a", "b", "c"]} for i in range(50)])
    train, held = split_groups(groups, eval_size=8, seed=0)
    assert len(held) == 8 and len(train) == 42
    assert not {g.prompt for g in train} & {g.prompt for g in held}
    assert all(len(g.pairs) == 3 for g in held)
    _, few = split_groups(groups[:10], eval_size=8, seed=0)
    assert len(few) == 2  # never more than a fifth


# ----------------------------------------------------------------------------- the built-in labeller


def test_labeller_prefers_correct_then_shorter_and_skips_ties():
    right, longer, wrong1, wrong2 = "<answer>12</answer>", "3+9=12 <answer>12</answer>", "<answer>13</answer>", "x"
    group = label_group("3+9=", "12", [right, longer, wrong1, wrong2, right], 0.0, random.Random(0))
    pairs = {(group.answers[b], group.answers[w]) for b, w, _ in group.pairs}
    assert pairs == {(right, longer), (right, wrong1), (right, wrong2), (longer, wrong1), (longer, wrong2)}
    assert (wrong1, wrong2) not in pairs and (wrong2, wrong1) not in pairs  # two wrong answers: no preference
    kinds = dict(zip([(group.answers[b], group.answers[w]) for b, w, _ in group.pairs], group.kinds))
    assert kinds[(right, longer)] == "short>long" and kinds[(right, wrong1)] == "correct>wrong"
    # two correct answers of equal length are not compared either
    assert not label_group("q", "7", ["<answer>07</answer>", "<answer> 7</answer>"], 0.0, random.Random(0)).pairs


def test_label_noise_flips_about_that_fraction():
    answers = ["<answer>5</answer>"] + [f"<answer>{i}</answer>" for i in range(10, 60)]
    group = label_group("2+3=", "5", answers, 0.25, random.Random(1))
    flipped = sum(group.answers[b] != "<answer>5</answer>" for b, _, _ in group.pairs)
    assert len(group.pairs) == 50 and 5 <= flipped <= 20


def test_corrupted_answers_are_always_wrong():
    rng = random.Random(0)
    for value in ["0", "7", "10", "36", "-4", "123"]:
        for _ in range(50):
            assert not is_correct(corrupt_answer(value, rng), value)
    assert is_correct(completion_for("12"), "12") and is_correct("<answer>012</answer>", "12")


def test_builtin_preferences_without_a_policy():
    task = ArithmeticTask(min_digits=1, max_digits=1, operators="+", steps=2)
    config = BuiltinPreferenceConfig(num_prompts=40, eval_prompts=10, num_corrupted=3, label_noise=0.4)
    exclude = {"1+2+3=", "4+5+6="}
    train, held = builtin_preferences(config, task, seed=0, exclude=exclude)
    assert len(train) == 40 and len(held) == 10
    assert not {g.prompt for g in train + held} & exclude
    assert not {g.prompt for g in train} & {g.prompt for g in held}
    for group in held:  # held-out pairs are never flipped, whatever the noise
        truth = str(eval(group.prompt[:-1]))
        for better, worse, _ in group.pairs:
            b, w = group.answers[better], group.answers[worse]
            assert is_correct(b, truth) and (not is_correct(w, truth) or len(b) < len(w))
    flipped = sum(not is_correct(g.answers[b], str(eval(g.prompt[:-1]))) for g in train for b, _, _ in g.pairs)
    assert 0.2 < flipped / count_pairs(train) < 0.6


def test_builtin_preferences_sample_the_policy(model, tokenizer):
    task = ArithmeticTask(min_digits=1, max_digits=1, operators="+", steps=1)
    config = BuiltinPreferenceConfig(num_prompts=6, eval_prompts=2, answers_per_prompt=4, num_corrupted=1,
                                     include_long_correct=False, max_new_tokens=5)
    train, held = builtin_preferences(config, task, seed=0, tokenizer=tokenizer, policy=model)
    # a random tiny model never answers right: every pair is the right answer against a sampled or corrupted one
    for group in train + held:
        assert len(group.answers) >= 3
        assert {group.answers[b] for b, _, _ in group.pairs} == {completion_for(str(eval(group.prompt[:-1])))}
