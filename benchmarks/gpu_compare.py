"""policyopt (vLLM rollout engine, bf16) against TRL 1.16's GRPOTrainer with vLLM colocated, on one GPU.

    pip install -e ".[vllm,bench]"                   # vllm and trl==1.16.0
    python benchmarks/gpu_compare.py --steps 8 --warmup 2 --out benchmarks/results/gpu_compare.json
    python benchmarks/gpu_compare.py --tiny --device cpu --steps 2 --warmup 1    # smoke test (.venv-vllm)

Both tools train the same Qwen2-0.5B-shaped model (vocab 151936, hidden 896, 24 layers, 14 heads, 2 KV
heads, MLP 4864, tied embeddings), built from its config with random weights (timing needs no trained
weights) and saved once under --workdir, on the same prompts, with the same G, prompts per step, answer
length, one optimizer update per step, beta = 0, lr, clipping and temperature. Each tool runs in its own
subprocess, so its peak memory is its own.

Reported per tool (medians over --steps steps after --warmup): seconds per step, tokens per second
(prompt + answer tokens of the step's answers / seconds), generation seconds, peak device memory
(the GPU's used memory, sampled every 20 ms: vLLM's own allocator is outside torch's counters; on a CPU
the process's peak RSS) and MFU = (6 N T_trained + 2 N T_sampled) / (seconds x peak FLOP/s), with N
the parameter count, T_trained = T_sampled = the step's prompt + answer tokens (attention FLOPs not
counted; the same definition for both tools, so the ratio is what compares).

The smoke mode (--tiny: a 2-layer, head_dim 32 model; --device cpu) runs policyopt through vLLM's CPU
build, and TRL without vLLM: TRL's colocated weight sync (``model_runner.model.load_weights``) fails on
vLLM's CPU worker, so a CPU run measures nothing about it; only a GPU run compares the two.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a test loads this file by path
from trl_timing import step_timer  # noqa: E402

HERE = Path(__file__).resolve()
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=128, max_position_embeddings=512)  # head_dim 32: vLLM's CPU attention needs >= 32
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU


def vowel_fraction_reward(prompts, completions, **kwargs):
    """A dense reward (almost no group has equal rewards), the same function for both tools."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


# ------------------------------------------------------------------ shared setup


def prepare(workdir: Path, tiny: bool, seed: int) -> dict:
    """The model directory (config, random weights, tokenizer) and the prompts, built once."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from policyopt.models.tiny import build_tokenizer

    name = "tiny" if tiny else "qwen2-0.5b-shape"
    model_dir, data = workdir / name, workdir / "prompts.jsonl"
    rng = random.Random(seed)
    problems = [(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(2048)]
    if not data.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps({"prompt": f"Q: {a}+{b}=\nA: ", "answer": str(a + b)}) + "\n"
                                for a, b in problems))
    if not (model_dir / "config.json").exists():
        tokenizer = build_tokenizer([f"Q: {a}+{b}=\nA: {a + b}" for a, b in problems], vocab_size=400)
        shape = TINY if tiny else QWEN2_05B  # the vocabulary is the model's; ids past the tokenizer's decode to ""
        config = Qwen2Config(**shape, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return {"model_dir": str(model_dir), "data": str(data)}


class PeakMemory:
    """Peak device memory in MiB: the GPU's used memory sampled every 20 ms (everything this process
    holds, vLLM's allocator included), or the process's peak RSS on a CPU."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0.0, threading.Event()
        if device == "cuda":
            threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, (total - free) / 2**20)
            time.sleep(0.02)

    def read(self) -> float:
        self._stop.set()
        if self.device == "cuda":
            return self.peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ one tool per subprocess


def worker_policyopt(spec: dict) -> dict:
    from policyopt.recipes.grpo import GRPOConfig, run_grpo
    from policyopt.runtime.config import config_from_dict

    memory = PeakMemory(spec["device"])
    config = config_from_dict(GRPOConfig, {
        "output_dir": spec["output_dir"], "seed": spec["seed"], "steps": spec["warmup"] + spec["steps"],
        "prompts_per_step": spec["prompts"], "group_size": spec["G"], "beta": 0.0,
        "sampling": {"max_new_tokens": spec["max_new_tokens"], "temperature": 1.0},
        "model": {"name_or_path": spec["model_dir"], "device": spec["device"], "dtype": spec["dtype"],
                  "autocast": "off"},
        "data": {"path": spec["data"], "eval_size": 0},
        "optim": {"lr": 1e-6, "warmup_steps": 0}, "eval_every": 0, "tensorboard": False,
        "rewards": [{"function": f"{HERE}:vowel_fraction_reward"}],
        "rollout": {"engine": "vllm", "vllm": {"gpu_memory_utilization": spec["gpu_memory_utilization"]}},
    })
    run_grpo(config)
    records = [json.loads(line) for line in (Path(spec["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "seconds_per_step" in r]
    return {"seconds": [r["seconds_per_step"] for r in records],
            "generation_seconds": [r["generation_seconds"] for r in records],
            "tokens": [r["tokens_per_second"] * r["seconds_per_step"] for r in records],
            "completion_length": [r["completion_length"] for r in records],
            "mismatch_abs_logp_diff": [r.get("mismatch/abs_logp_diff") for r in records],
            "peak_memory_mib": memory.read()}


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    memory = PeakMemory(spec["device"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.padding_side = "left"
    dataset = Dataset.from_list([json.loads(line) for line in Path(spec["data"]).read_text().splitlines()])
    on_gpu = spec["device"] == "cuda"
    n = spec["prompts"] * spec["G"]
    args = GRPOConfig(
        output_dir=spec["output_dir"], max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=n,
        gradient_accumulation_steps=1, num_generations=spec["G"], max_completion_length=spec["max_new_tokens"],
        seed=spec["seed"], beta=0.0, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        epsilon=0.2, temperature=1.0, num_iterations=1, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, bf16=on_gpu and spec["dtype"] == "bfloat16", use_cpu=not on_gpu,
        **(dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=spec["gpu_memory_utilization"],
                vllm_enable_sleep_mode=True) if on_gpu else {}))
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)
    trainer = GRPOTrainer(model=model, reward_funcs=vowel_fraction_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)

    timer = step_timer("num_tokens")
    trainer.add_callback(timer)
    trainer.train()
    seen = [log["num_tokens"] for log in timer.logs]  # TRL's running count of prompt + answer tokens
    return {"seconds": timer.seconds, "tokens": [b - a for a, b in zip([0.0] + seen, seen)],
            "completion_length": [log.get("completions/mean_length") for log in timer.logs],
            "use_vllm": on_gpu, "peak_memory_mib": memory.read()}


# ------------------------------------------------------------------ the harness


def summarise(result: dict, spec: dict, parameters: int) -> dict:
    keep = slice(spec["warmup"], None)
    seconds = statistics.median(result["seconds"][keep])
    tokens = statistics.median(result["tokens"][keep])
    out = {"seconds_per_step": seconds, "tokens_per_second": tokens / seconds,
           "peak_memory_mib": result["peak_memory_mib"],
           "completion_length": statistics.median(x for x in result["completion_length"][keep] if x is not None)}
    if "generation_seconds" in result:
        out["generation_seconds"] = statistics.median(result["generation_seconds"][keep])
    if result.get("mismatch_abs_logp_diff") and result["mismatch_abs_logp_diff"][-1] is not None:
        out["mismatch_abs_logp_diff"] = statistics.median(result["mismatch_abs_logp_diff"][keep])
    peak = spec.get("peak_flops")
    out["mfu"] = (6 + 2) * parameters * tokens / (seconds * peak) if peak else None
    for key in ("use_vllm",):
        if key in result:
            out[key] = result[key]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test) instead of Qwen2-0.5B's shape")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tools", default="policyopt,trl")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--G", type=int, default=8, help="answers per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/gpu_compare")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # inside the subprocess of one tool
        spec = json.loads(args.spec)
        result = {"policyopt": worker_policyopt, "trl": worker_trl}[args.worker](spec)
        Path(spec["result_path"]).write_text(json.dumps(result))
        return 0

    workdir = Path(args.workdir)
    paths = prepare(workdir, args.tiny, args.seed)
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    with torch.device("meta"):
        parameters = sum(p.numel() for p in Qwen2ForCausalLM(AutoConfig.from_pretrained(paths["model_dir"])).parameters())
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if gpu and name in gpu), None)
    results = {"device": gpu or "cpu", "parameters": parameters, "peak_bf16_flops": peak,
               "settings": {k: getattr(args, k) for k in ("prompts", "G", "max_new_tokens", "steps", "warmup",
                                                          "tiny", "gpu_memory_utilization")}, "tools": {}}
    for tool in args.tools.split(","):
        spec = {**paths, "device": args.device, "dtype": "bfloat16" if args.device == "cuda" else "float32",
                "steps": args.steps, "warmup": args.warmup, "prompts": args.prompts, "G": args.G,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed, "peak_flops": peak,
                "gpu_memory_utilization": args.gpu_memory_utilization,
                "output_dir": str(workdir / f"run-{tool}"), "result_path": str(workdir / f"result-{tool}.json")}
        Path(spec["result_path"]).unlink(missing_ok=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE), "--worker", tool, "--spec", json.dumps(spec)],
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode != 0 or not Path(spec["result_path"]).exists():
            results["tools"][tool] = {"error": f"exit status {done.returncode}"}
            continue
        results["tools"][tool] = summarise(json.loads(Path(spec["result_path"]).read_text()), spec, parameters)
        results["tools"][tool]["wall_seconds"] = time.perf_counter() - started
    tools = results["tools"]
    if all("seconds_per_step" in tools.get(t, {}) for t in ("policyopt", "trl")):
        results["policyopt_over_trl_seconds"] = tools["policyopt"]["seconds_per_step"] / tools["trl"]["seconds_per_step"]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if all("error" not in r for r in tools.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
