import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from policyopt.data.arithmetic import (
    ArithmeticTask,
    completion_for,
    evaluate,
    make_demonstrations,
    make_problem,
    make_rows,
)
from policyopt.data.loading import DataError, completion_text, format_prompt, load_rows

# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    "expression, value",
    [("2+3*4", 14), ("2*3+4", 10), ("10-2-3", 5), ("2*3-4*5+6", -8), ("7", 7), ("0*9-9", -9)],
)
def test_evaluate_uses_precedence_and_left_associativity(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize("bad", ["", "2+", "+2", "2++3", "2/3", "2+x"])
def test_evaluate_rejects_non_expressions(bad):
    with pytest.raises(ValueError):
        evaluate(bad)


def test_make_problem_literal_example():
    task = ArithmeticTask(min_digits=1, max_digits=1, operators="+*", steps=2)
    rng = random.Random(0)
    for _ in range(200_000):
        row = make_problem(rng, task)
        if row["expression"] == "2+3*4":
            break
    else:
        pytest.fail("generator never produced 2+3*4")
    assert row == {"prompt": "2+3*4=", "answer": "14", "expression": "2+3*4"}


def test_seeded_rows_have_correct_answers():
    task = ArithmeticTask(min_digits=1, max_digits=3, operators="+-*", steps=3)
    for row in make_rows(200, task, seed=7):
        # Python's own parser is an independent oracle; it also rejects leading zeros.
        assert row["answer"] == str(eval(row["expression"]))
        assert row["prompt"] == row["expression"] + "="


def test_problem_shape_follows_task():
    task = ArithmeticTask(min_digits=2, max_digits=3, operators="-*", steps=2)
    rows = make_rows(300, task, seed=1)
    digit_counts, operators = set(), set()
    for row in rows:
        tokens = row["expression"].replace("-", " - ").replace("*", " * ").split()
        numbers, ops = tokens[::2], tokens[1::2]
        assert len(ops) == 2
        operators.update(ops)
        digit_counts.update(len(n) for n in numbers)
        assert all(not n.startswith("0") for n in numbers)
    assert digit_counts == {2, 3}
    assert operators == {"-", "*"}


def test_one_digit_operands_include_zero():
    rows = make_rows(100, ArithmeticTask(max_digits=1, operators="+", steps=1), seed=0)
    assert {r["expression"] for r in rows} == {f"{a}+{b}" for a in range(10) for b in range(10)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_digits": 0}, "min_digits"),
        ({"max_digits": 7}, "max_digits"),
        ({"min_digits": 3, "max_digits": 2}, "must not exceed"),
        ({"operators": "+/"}, "operators"),
        ({"operators": ""}, "operators"),
        ({"steps": 0}, "steps"),
        ({"steps": 5}, "steps"),
    ],
)
def test_task_validate(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArithmeticTask(**kwargs).validate()
    with pytest.raises(ValueError, match=message):
        make_rows(1, ArithmeticTask(**kwargs), seed=0)


def test_make_rows_distinct_and_seeded():
    task = ArithmeticTask()
    rows = make_rows(500, task, seed=3)
    prompts = [r["prompt"] for r in rows]
    assert len(rows) == 500 and len(set(prompts)) == 500
    assert make_rows(500, task, seed=3) == rows
    assert make_rows(500, task, seed=4) != rows


def test_make_rows_exclude():
    task = ArithmeticTask()
    train = {r["prompt"] for r in make_rows(1000, task, seed=0)}
    test = make_rows(1000, task, seed=0, exclude=train)
    assert len(test) == 1000
    assert not train & {r["prompt"] for r in test}


def test_make_rows_space_too_small():
    task = ArithmeticTask(max_digits=1, operators="+", steps=1)  # 100 problems
    assert len(make_rows(100, task, seed=0)) == 100
    with pytest.raises(ValueError, match="only 100 distinct"):
        make_rows(101, task, seed=0)
    everything = {r["prompt"] for r in make_rows(100, task, seed=0)}
    with pytest.raises(ValueError, match="could only make 0 of 1"):
        make_rows(1, task, seed=0, exclude=everything)


def test_make_demonstrations():
    rows = make_demonstrations(20, ArithmeticTask(), seed=5)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in make_rows(20, ArithmeticTask(), seed=5)]
    for row in rows:
        assert row["completion"] == f"<answer>{row['answer']}</answer>"
    assert completion_for("-12") == "<answer>-12</answer>"


# ---------------------------------------------------------------- loading


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_load_jsonl(tmp_path):
    path = write_lines(
        tmp_path / "data.jsonl",
        [json.dumps({"prompt": "1+1=", "answer": "2"}), "", json.dumps({"prompt": "2+2=", "answer": 4})],
    )
    assert load_rows(path) == [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": 4}]


def test_load_jsonl_chat_prompts(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps({"prompt": messages, "answer": "2"})])
    assert load_rows(path) == [{"prompt": messages, "answer": "2"}]


def test_load_renames_prompt_column(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [json.dumps({"question": "3*3=", "answer": "9", "id": 1})])
    assert load_rows(path, prompt_column="question") == [{"prompt": "3*3=", "answer": "9", "id": 1}]


def test_load_rename_clash(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [json.dumps({"question": "a", "prompt": "b"})])
    with pytest.raises(DataError, match="both 'question' and 'prompt'"):
        load_rows(path, prompt_column="question")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "a"}), "", '{"prompt": "b",'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_rows(path)


def test_row_not_an_object(tmp_path):
    # The blank line counts: errors name the file's line, not the row's position.
    path = write_lines(tmp_path / "rows.jsonl", [json.dumps({"prompt": "a"}), "", "[1, 2]"])
    with pytest.raises(DataError, match=r"rows\.jsonl:3: expected a JSON object, got list"):
        load_rows(path)


def test_missing_prompt_column_lists_columns(tmp_path):
    path = write_lines(tmp_path / "cols.jsonl", [json.dumps({"question": "a", "answer": "1"})])
    with pytest.raises(DataError) as info:
        load_rows(path)
    message = str(info.value)
    assert "cols.jsonl:1" in message and "'prompt'" in message
    assert "['answer', 'question']" in message


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("   ", "is an empty string"),
        (5, "must be a string or a list of chat messages, got int"),
        (None, "must be a string or a list of chat messages, got NoneType"),
        ([], "is an empty list of messages"),
        ([{"role": "user"}], "message 0 is not a chat message"),
        ([{"role": "user", "content": "x"}, "hi"], "message 1 is not a chat message"),
    ],
)
def test_bad_prompts(tmp_path, prompt, message):
    path = write_lines(
        tmp_path / "p.jsonl", [json.dumps({"prompt": "fine"}), json.dumps({"prompt": prompt})]
    )
    with pytest.raises(DataError, match=r"p\.jsonl:2: 'prompt' " + message):
        load_rows(path)


@pytest.mark.parametrize("name, text", [("empty.jsonl", "\n\n"), ("empty.json", "[]")])
def test_empty_dataset(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=name.replace(".", r"\.") + " has no rows"):
        load_rows(str(tmp_path / name))


def test_load_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "a", "x": 1}, {"prompt": "b", "x": 2}]))
    assert load_rows(str(path)) == [{"prompt": "a", "x": 1}, {"prompt": "b", "x": 2}]


def test_load_json_errors(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"prompt": "a"}))
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        load_rows(str(path))
    path = tmp_path / "broken.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        load_rows(str(path))
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": ""}]))
    with pytest.raises(DataError, match=r"rows\.json: row 1: 'prompt' is an empty string"):
        load_rows(str(path))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt\na\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(path))


def test_parquet_round_trip(tmp_path):
    rows = [
        {"prompt": "1+2=", "answer": "3"},
        {"prompt": "4*5=", "answer": "20"},
    ]
    path = str(tmp_path / "data.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_rows(path) == rows


def test_parquet_chat_prompts_and_row_errors(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "x"}]
    path = str(tmp_path / "chat.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_rows(path) == rows

    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": "b"}, {"prompt": ""}]), path)
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: 'prompt' is an empty string"):
        load_rows(path)

    path = str(tmp_path / "cols.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "a"}]), path)
    with pytest.raises(DataError, match=r"cols\.parquet: row 0: missing prompt column 'prompt'; columns are \['text'\]"):
        load_rows(path)


def test_load_saved_dataset(tmp_path):
    import datasets

    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    assert load_rows(str(tmp_path / "plain")) == rows

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "splits"))
    assert load_rows(str(tmp_path / "splits")) == rows

    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(DataError, match="no 'train' split"):
        load_rows(str(tmp_path / "notrain"))


def test_format_prompt():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    )
    messages = [{"role": "user", "content": "1+1?"}]
    assert format_prompt(tokenizer, "1+1=") == "1+1="
    with pytest.raises(DataError, match="prompts are chat messages but the tokenizer has no chat template"):
        format_prompt(tokenizer, messages)

    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert format_prompt(tokenizer, messages) == "<user>1+1?<assistant>"


def test_completion_text():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]) == "y"
