"""Name -> function tables, so a config picks its math by key (as verl's ``core_algos`` does).

A new advantage estimator, KL estimator, policy loss or loss aggregation is one function with its
equation in the docstring, registered under one key; configs list the keys as ``Literal`` choices.
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(dict):
    """A dict of named functions of one kind, with a decorator to add one and an error naming the keys."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name].__name__}, {fn.__name__})")
            self[name] = fn
            return fn

        return add

    def get_fn(self, name: str) -> Callable:
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self)}")
        return self[name]
