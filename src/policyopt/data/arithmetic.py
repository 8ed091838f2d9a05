"""Built-in verifiable task: integer arithmetic problems with exact answers."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

ALLOWED_OPERATORS = "+-*"
_TOKEN = re.compile(r"\d+|[+\-*]")


@dataclass
class ArithmeticTask:
    """Shape of the generated problems, e.g. ``12+7*3=`` for steps=2."""

    min_digits: int = 1  # fewest digits of an operand
    max_digits: int = 2  # most digits of an operand
    operators: str = "+-*"  # the operators problems draw from, e.g. "+" or "+-*"
    steps: int = 1  # operations per problem (steps + 1 operands)

    def validate(self) -> None:
        """Raise ValueError if any setting is out of range."""
        if not 1 <= self.min_digits <= 6:
            raise ValueError(f"min_digits must be between 1 and 6, got {self.min_digits}")
        if not 1 <= self.max_digits <= 6:
            raise ValueError(f"max_digits must be between 1 and 6, got {self.max_digits}")
        if self.min_digits > self.max_digits:
            raise ValueError(
                f"min_digits ({self.min_digits}) must not exceed max_digits ({self.max_digits})"
            )
        if not self.operators or not set(self.operators) <= set(ALLOWED_OPERATORS):
            raise ValueError(
                f"operators must be a non-empty subset of {ALLOWED_OPERATORS!r}, "
                f"got {self.operators!r}"
            )
        if not 1 <= self.steps <= 4:
            raise ValueError(f"steps must be between 1 and 4, got {self.steps}")

    def num_problems(self) -> int:
        """Number of distinct expressions this task can generate."""
        operands = sum(_count_with_digits(d) for d in range(self.min_digits, self.max_digits + 1))
        return operands ** (self.steps + 1) * len(set(self.operators)) ** self.steps


def _count_with_digits(digits: int) -> int:
    # 0..9 are the one-digit numbers; longer numbers have no leading zero.
    return 10 if digits == 1 else 9 * 10 ** (digits - 1)


def _random_operand(rng: random.Random, task: ArithmeticTask) -> int:
    digits = rng.randint(task.min_digits, task.max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def evaluate(expression: str) -> int:
    """Evaluate non-negative integers joined by + - * with the usual precedence."""
    tokens = _TOKEN.findall(expression)
    if "".join(tokens) != expression.replace(" ", "") or len(tokens) % 2 == 0:
        raise ValueError(f"not an integer arithmetic expression: {expression!r}")
    # Sum of signed products: '*' binds tighter than '+' and '-'.
    total, sign, product = 0, 1, int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        if not operand.isdigit() or op.isdigit():
            raise ValueError(f"not an integer arithmetic expression: {expression!r}")
        if op == "*":
            product *= int(operand)
        else:
            total += sign * product
            sign, product = (1 if op == "+" else -1), int(operand)
    return total + sign * product


def make_problem(rng: random.Random, task: ArithmeticTask) -> dict:
    """One problem: {"prompt": "12+7*3=", "answer": "33", "expression": "12+7*3"}."""
    task.validate()
    operators = sorted(set(task.operators))
    parts = [str(_random_operand(rng, task))]
    for _ in range(task.steps):
        parts.append(rng.choice(operators))
        parts.append(str(_random_operand(rng, task)))
    expression = "".join(parts)
    return {"prompt": f"{expression}=", "answer": str(evaluate(expression)), "expression": expression}


def completion_for(answer: str) -> str:
    """The demonstration completion for an answer."""
    return f"<answer>{answer}</answer>"


def make_rows(
    n: int, task: ArithmeticTask, seed: int, exclude: set[str] | None = None
) -> list[dict]:
    """n problems with distinct prompts, none of which is in ``exclude``."""
    task.validate()
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    space = task.num_problems()
    if n > space:
        raise ValueError(
            f"the arithmetic task {task} has only {space} distinct problems; cannot make {n}"
        )
    exclude = exclude or set()
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    max_tries = 100 * n + 10_000
    tries = 0
    while len(rows) < n:
        if tries >= max_tries:
            raise ValueError(
                f"could only make {len(rows)} of {n} distinct problems for {task} after "
                f"{max_tries} tries (space of {space} problems, {len(exclude)} excluded); "
                "widen the task (more digits, steps or operators) or ask for fewer rows"
            )
        tries += 1
        row = make_problem(rng, task)
        if row["prompt"] in seen or row["prompt"] in exclude:
            continue
        seen.add(row["prompt"])
        rows.append(row)
    return rows


def make_demonstrations(
    n: int, task: ArithmeticTask, seed: int, exclude: set[str] | None = None
) -> list[dict]:
    """Like make_rows, with a "completion" column holding the demonstration text."""
    rows = make_rows(n, task, seed, exclude)
    for row in rows:
        row["completion"] = completion_for(row["answer"])
    return rows
