import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from policyopt.models import loading
from policyopt.models.loading import ModelLoadError, load_causal_lm, load_tokenizer, resolve_autocast, resolve_dtype
from policyopt.models.tiny import TinyModelConfig


def test_tokenizer_encodes_any_text_and_has_special_tokens(tokenizer):
    for text in ["12+7=<answer>19</answer>", "héllo wörld ✓ 中文", "tabs\tand\nnewlines"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # digits are never merged, so 123 is three tokens
    assert len(tokenizer("123", add_special_tokens=False)["input_ids"]) == 3
    # the answer tag was frequent in the training text and is no longer spelled byte by byte
    assert len(tokenizer("<answer>", add_special_tokens=False)["input_ids"]) < len("<answer>")


def test_chat_template_renders_generation_prompt(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2="}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|user|>2+2=\n<|assistant|>"


def test_save_and_reload_with_auto_classes(tokenizer, model, tmp_path):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok2("3*4=<answer>12</answer>")["input_ids"]])
    assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-6)
    assert tok2.chat_template == tokenizer.chat_template


def test_loading_errors_name_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(str(tmp_path / "missing-model"), torch.float32, torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer("./no/such/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty"):
        load_causal_lm(str(tmp_path / "empty"), torch.float32, torch.device("cpu"))


def test_tokenizer_without_pad_falls_back_to_eos(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    raw = AutoTokenizer.from_pretrained(tmp_path)
    raw.pad_token = None
    raw.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id
    assert loaded.padding_side == "left"


def test_cpu_defaults_to_float32():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_autocast_auto_only_where_it_pays(model, monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_autocast("off", "auto", model, cpu) is None
    assert resolve_autocast("bfloat16", "float32", model, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="autocast"):
        resolve_autocast("fp8", "auto", model, cpu)
    monkeypatch.setattr(loading, "cpu_has_bf16_matmul_units", lambda: True)
    wide = type("Config", (), {"hidden_size": loading.AUTOCAST_MIN_HIDDEN})()
    monkeypatch.setattr(model, "config", wide)
    assert resolve_autocast("auto", "auto", model, cpu) == torch.bfloat16
    assert resolve_autocast("auto", "float32", model, cpu) is None  # explicit fp32 means fp32 compute
    assert resolve_autocast("auto", "auto", model, torch.device("cuda")) is None  # GPUs default to bf16 weights
    wide.hidden_size = loading.AUTOCAST_MIN_HIDDEN - 1
    assert resolve_autocast("auto", "auto", model, cpu) is None  # too narrow: casts cost more than they save
    monkeypatch.setattr(loading, "cpu_has_bf16_matmul_units", lambda: False)
    wide.hidden_size = 4096
    assert resolve_autocast("auto", "auto", model, cpu) is None


def test_tiny_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        TinyModelConfig(hidden_size=30, num_heads=4).validate()
