"""Load user prompt datasets (JSONL, JSON, parquet, datasets' save_to_disk) and validate them."""

from __future__ import annotations

import json
import os
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")


class DataError(ValueError):
    """A dataset file is missing, malformed, or has rows without a usable prompt."""


def load_rows(path: str, prompt_column: str = "prompt") -> list[dict]:
    """Read a dataset and return its rows, each with the prompt under the key "prompt"."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        located = _by_index(path, _read_saved_dataset(path))
    else:
        lower = path.lower()
        if lower.endswith(JSONL_SUFFIXES):
            located = _read_jsonl(path)
        elif lower.endswith(".json"):
            located = _by_index(path, _read_json(path))
        elif lower.endswith(".parquet"):
            located = _by_index(path, _read_parquet(path))
        else:
            raise DataError(
                f"{path}: unsupported file type; use .jsonl, .json, .parquet "
                "or a directory written by datasets' save_to_disk"
            )
    if not located:
        raise DataError(f"{path} has no rows")
    return [_check_row(row, where, prompt_column) for where, row in located]


def _by_index(path: str, rows: list) -> list[tuple[str, Any]]:
    return [(f"{path}: row {i}", row) for i, row in enumerate(rows)]


def _decode(path: str, raw: bytes, line: int, starts_file: bool = True) -> str:
    """``raw`` (from ``line`` on) as UTF-8, a byte-order mark at the file's start dropped, or a DataError
    naming the file, line and byte."""
    try:
        return raw.decode("utf-8-sig" if starts_file else "utf-8")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at column {column}); "
                        "is it a binary file? Datasets must be UTF-8 JSON lines, JSON or parquet") from None


def _read_jsonl(path: str) -> list[tuple[str, Any]]:
    """(location "file:line", row) pairs; blank lines are skipped."""
    located = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _decode(path, raw, number, starts_file=number == 1)
            if "\x00" in line:
                raise DataError(f"{path}:{number}: holds NUL bytes; is it a binary file? Datasets must be UTF-8 "
                                "JSON lines, JSON or parquet")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from e
            located.append((f"{path}:{number}", row))
    return located


def _read_json(path: str) -> list:
    with open(path, "rb") as f:
        text = _decode(path, f.read(), 1)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno}); "
                "a .json file must hold a list of objects (use .jsonl for one object per line)"
            ) from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return data


def _read_parquet(path: str) -> list:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: could not read parquet file: {e}") from e
    return table.to_pylist()


def _read_saved_dataset(path: str) -> list:
    import datasets

    try:
        data = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(
            f"{path}: could not load directory with datasets.load_from_disk: {e}"
        ) from e
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"{path}: saved DatasetDict has no 'train' split (splits: {list(data)})")
        data = data["train"]
    return data.to_list()


def _check_row(row: Any, where: str, prompt_column: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if prompt_column not in row:
        raise DataError(
            f"{where}: missing prompt column {prompt_column!r}; columns are {sorted(row)}"
        )
    prompt = row[prompt_column]
    problem = _prompt_problem(prompt)
    if problem:
        raise DataError(f"{where}: {prompt_column!r} {problem}")
    if prompt_column == "prompt":
        return dict(row)
    if "prompt" in row:
        raise DataError(
            f"{where}: has both {prompt_column!r} and 'prompt' columns; rename one of them"
        )
    out = {k: v for k, v in row.items() if k != prompt_column}
    out["prompt"] = prompt
    return out


CHAT_ROLES = ("system", "user", "assistant", "tool")  # what chat templates render; any other role is refused


def role_problem(role: str) -> str | None:
    """Why a chat message's role is refused (chat templates render an unknown one as some other turn), or None."""
    if role in CHAT_ROLES:
        return None
    return f"has role {role!r:.40}; chat messages take one of {', '.join(CHAT_ROLES)}"


def _prompt_problem(prompt: Any) -> str | None:
    """Why a prompt is unusable, or None if it is a non-empty string or chat-message list."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "is an empty string"
    if isinstance(prompt, list):
        if not prompt:
            return "is an empty list of messages"
        for j, message in enumerate(prompt):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                return (
                    f"message {j} is not a chat message "
                    f'{{"role": str, "content": str}}: {message!r}'
                )
            problem = role_problem(message["role"])
            if problem:
                return f"message {j} {problem}"
        return None
    return f"must be a string or a list of chat messages, got {type(prompt).__name__}"


def format_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The text the model sees: strings as is, chat messages through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the dataset's prompts are chat messages but the tokenizer has no chat template; "
            "use plain-string prompts or a tokenizer with a chat_template"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def completion_text(completion: str | list[dict]) -> str:
    """The text of a completion: strings as is, the last message's content for chat messages."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    return completion[-1].get("content") or ""


def prompt_text(prompt: str | list[dict]) -> str:
    """The raw text of a prompt, for training a tokenizer on it: chat messages' contents joined."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)
