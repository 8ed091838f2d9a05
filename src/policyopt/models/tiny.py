"""Build a tokenizer and a tiny causal LM locally, with no download.

The embedded demo and the tests need a model that exists on any machine. We train a byte-level
BPE tokenizer on the task's own text (so any text still encodes: unknown characters fall back to
bytes) and instantiate a small Llama-style model from a config. Both are saved with
``save_pretrained`` and reload with ``AutoTokenizer`` / ``AutoModelForCausalLM`` like any hub model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN]

# A minimal chat template: one role marker per message, the assistant's turn ends with EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% else %}<|assistant|>{{ message['content'] }}<|endoftext|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class TinyModelConfig:
    """Shape of the locally built model (Llama-style: RMSNorm, RoPE, SwiGLU, tied embeddings)."""

    hidden_size: int = 64  # width of the built model
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads (must divide hidden_size)
    intermediate_size: int = 256  # width of each MLP
    max_position_embeddings: int = 256  # longest prompt + answer the model handles
    vocab_size: int = 320  # target BPE vocabulary (256 bytes + specials + merges)

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.tiny.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.tiny.num_heads ({self.num_heads})"
            )
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.tiny.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"model.tiny.vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                f"(256 bytes + special tokens), got {self.vocab_size}"
            )


def build_tokenizer(texts: Iterable[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Digits are always split one per token: multi-digit merges would make arithmetic much harder to
    learn for a small model. Frequent strings such as ``<answer>`` still merge into single tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # prompts are left-padded for batched generation
    return fast


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, config: TinyModelConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama-style causal LM sized by ``config``, matched to ``tokenizer``."""
    config.validate()
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
