"""PPO's policy and critic as one module: token log-probabilities and values V(s_t) in one call.

The value V_t estimates the return from state s_t = (prompt, o_<t), before token o_t is emitted, so it
is read from the same hidden state that predicts o_t (as in TRL: ``values[:, context_length - 1 : -1]``).
Two layouts:

- ``shared`` (default): a linear value head on the policy's own backbone, zero-initialised so every
  value starts at 0. One forward pass gives both the token distribution and the values; the value
  loss also trains the shared backbone.
- ``separate``: a second transformer with a scalar head (``AutoModelForSequenceClassification``,
  one label), e.g. initialised from the reward model as in InstructGPT. Twice the forward compute
  and memory for a critic that does not disturb the policy's features.

Either way the module is a single ``nn.Module``, so one optimizer and one backward pass cover the
policy and the critic together.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .reward_model import init_head, reward_head
from .forward import token_logprobs

VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyAndValue(nn.Module):
    returns_values = True  # models.forward.forward_rows: this module gives V(s_t) beside the log-probs

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None, head_init: str = "zero"):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        if value_model is None:
            parameter = next(policy.parameters())
            # float32 even for a bf16 policy: regression targets need the precision, and it is tiny
            self.value_head = nn.Linear(policy.config.get_text_config().hidden_size, 1, device=parameter.device,
                                        dtype=torch.float32)
            init_head(self.value_head, head_init)
        else:
            self.value_head = None
            reward_head(value_model)  # fail early on a model without a scalar head

    def value_module(self) -> nn.Module:
        """The critic's own parameters (the head, or the separate model): a checkpoint's value state."""
        return self.value_head if self.value_model is None else self.value_model

    @property
    def layout(self) -> str:
        return "shared" if self.value_model is None else "separate"

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                with_entropy: bool = False):
        """(log pi(o_t | q, o_<t) [N, T], entropy [N, T] or None, V(s_t) [N, T]) for every completion token.

        Log-probabilities are computed exactly as ``models.forward.completion_logprobs`` does (logits
        divided by the sampling temperature, only completion positions kept).
        """
        T = completion_ids.size(1)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=T + 1, output_hidden_states=self.value_model is None)
        # column t predicts completion token t (the last column is unused)
        logp, entropy = token_logprobs(out.logits, completion_ids, temperature, with_entropy)
        if self.value_model is None:
            hidden = out.hidden_states[-1][:, -(T + 1):-1]  # the final (normed) hidden state the LM head reads
            values = self.value_head(hidden.float()).squeeze(-1).float()  # fp32 even under autocast
        else:
            hidden = self.value_model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                                 position_ids=position_ids).last_hidden_state[:, -(T + 1):-1]
            values = reward_head(self.value_model)(hidden).squeeze(-1).float()
        return logp, entropy, values

    def save_value(self, directory: str | Path) -> Path:
        """The critic beside the policy: the head's weights in ``directory``, or a separate model under it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.value_model is None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                      str(directory / VALUE_HEAD_FILE))
            return directory / VALUE_HEAD_FILE
        self.value_model.save_pretrained(directory / "value_model")
        return directory / "value_model"
