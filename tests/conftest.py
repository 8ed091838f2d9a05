"""Shared fixtures: a tokenizer and a model of a few thousand parameters, built locally in seconds."""

import pytest
import torch

from policyopt.data.arithmetic import ArithmeticTask, make_demonstrations
from policyopt.models.tiny import TinyModelConfig, build_tiny_model, build_tokenizer

TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)


@pytest.fixture(scope="session")
def tokenizer():
    rows = make_demonstrations(200, ArithmeticTask(), seed=0)
    return build_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=TINY.vocab_size)


@pytest.fixture()
def model(tokenizer):
    torch.manual_seed(0)
    return build_tiny_model(tokenizer, TINY, seed=0)
