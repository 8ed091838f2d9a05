"""policyopt vs Hugging Face TRL's GRPOTrainer (and a bare PyTorch loop), same model, data and settings.

    pip install trl==1.16.0          # optional benchmark dependency, never a runtime one
    python benchmarks/trl_compare.py --workload all --model all --steps 12 --warmup 2 [--scaling]

Every (workload, model, tool, settings) cell runs in a fresh subprocess, so its peak memory (RSS
high-water mark, ``ru_maxrss``; ``torch.cuda.max_memory_allocated`` on a GPU) is its own. Step times
are medians over ``--steps`` steps after ``--warmup`` warm-up steps.

Workloads (4 prompts x G=8 answers per step, one optimizer update per step for every tool):
  a  fixed length: short arithmetic prompts, exactly ``--fixed-tokens`` (32) new tokens per answer. The
     model directory used here has an EOS id outside the model's vocabulary, so no tool can stop early.
     Reward: fraction of vowel characters (dense, so almost no group has zero reward spread).
  b  realistic: a ~200-token few-shot prompt (solved problems, then the question), answers that end at
     EOS (at most ``--realistic-tokens`` = 64), the exact-answer accuracy reward on a briefly
     SFT-warm-started model, so a share of groups have identical rewards (reported).

Settings: ``same`` = fp32, identical beta / lr (constant) / G / lengths / seed / loss (per-answer token mean
then mean over answers) / clipping / temperature for both tools; ``defaults`` = each tool's own defaults
with only the workload geometry set (TRL's effective defaults are recorded in the JSON).

Models are built locally (Qwen2ForCausalLM + a byte-level BPE tokenizer from policyopt.models.tiny)
under ``--workdir`` (/tmp/bench by default) and reused on later runs.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a test loads this file by path
from trl_timing import step_timer  # noqa: E402

HERE = Path(__file__).resolve()
PROMPTS_PER_STEP = 4
MODEL_SHAPES = {
    # name: (vocab, hidden, layers, heads, kv_heads, intermediate)  -> ~1.1M and ~20.7M parameters
    "small": (4096, 128, 2, 4, 2, 640),
    "large": (8192, 384, 8, 6, 2, 1536),
}


# --------------------------------------------------------------------------------------------------
# Reward functions (TRL's shape; both tools load the same ones). Each call is appended to
# $BENCH_REWARD_LOG so the harness sees the same rollout statistics for every tool.

def _log_call(prompts, completions, rewards, completion_ids=None):
    path = os.environ.get("BENCH_REWARD_LOG")
    if not path:
        return
    record = {"n": len(completions), "rewards": rewards, "prompts": list(prompts),
              "completion_tokens": [len(c) for c in completion_ids] if completion_ids is not None else None}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def vowel_fraction_reward(prompts, completions, completion_ids=None, **kwargs):
    """Fraction of the completion's characters that are vowels: dense, so answers almost never tie."""
    rewards = [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]
    _log_call(prompts, completions, rewards, completion_ids)
    return rewards


def logged_accuracy_reward(prompts, completions, answer, completion_ids=None, **kwargs):
    """policyopt's built-in exact-answer reward, logged."""
    from policyopt.rewards.builtin import accuracy_reward

    rewards = accuracy_reward(prompts, completions, answer)
    _log_call(prompts, completions, rewards, completion_ids)
    return rewards


REWARDS = {"a": "vowel_fraction_reward", "b": "logged_accuracy_reward"}


# --------------------------------------------------------------------------------------------------
# Preparation: tokenizers, models, datasets, SFT warm start for workload b.

def _pseudo_words(n: int, seed: int) -> list[str]:
    """Deterministic word-like text so the BPE learns a realistic number of merges."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr",
              "pl", "gr", "ch", "sh", "th", "br", "cl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck"]
    lexicon = ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]  # Zipf
    lines = []
    for _ in range(n):
        lines.append(" ".join(rng.choices(lexicon, weights, k=12)))
    return lines


def _problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice("+-")
    return f"{a}{op}{b}", str(a + b if op == "+" else a - b)


def _few_shot_prompt(rng: random.Random, tokenizer, target_tokens: int = 200) -> tuple[str, str]:
    question, answer = _problem(rng)
    tail = f"Q: {question}=\nA: "
    shots = []
    while True:
        q, a = _problem(rng)
        shot = f"Q: {q}=\nA: <answer>{a}</answer>\n"
        text = "".join(shots + [shot]) + tail
        if len(tokenizer(text)["input_ids"]) > target_tokens:
            break
        shots.append(shot)
    return "".join(shots) + tail, answer


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def prepare(workdir: Path, models: list[str], workloads: list[str], seed: int) -> dict:
    """Build (or reuse) everything the runs need; returns paths and facts."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from policyopt.models.tiny import build_tokenizer

    facts: dict = {}
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in models:
        vocab, hidden, layers, heads, kv_heads, inter = MODEL_SHAPES[name]
        base = workdir / "models" / name
        fixed = workdir / "models" / f"{name}-fixed"
        if not (base / "config.json").exists():
            rng = random.Random(seed)
            texts = _pseudo_words(20000, seed)
            texts += [f"Q: {q}=\nA: <answer>{a}</answer>\n" for q, a in (_problem(rng) for _ in range(2000))]
            tokenizer = build_tokenizer(texts, vocab_size=vocab)
            config = Qwen2Config(
                vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id)
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.save_pretrained(base)
            tokenizer.save_pretrained(base)
            # Fixed-length variant: the same weights; EOS is a new token outside the model's vocabulary,
            # so it can never be sampled and every answer runs to max_new_tokens, in every tool.
            vocab_in_model = len(tokenizer)
            tokenizer.add_special_tokens({"eos_token": "<|never|>"})
            assert tokenizer.eos_token_id >= vocab_in_model
            model.config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.save_pretrained(fixed)
            tokenizer.save_pretrained(fixed)
        from transformers import AutoConfig, AutoTokenizer

        cfg = AutoConfig.from_pretrained(base)
        facts[name] = {"dir": str(base), "fixed_dir": str(fixed), "vocab": cfg.vocab_size, "hidden": cfg.hidden_size,
                       "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                       "kv_heads": cfg.num_key_value_heads, "intermediate": cfg.intermediate_size,
                       "parameters": _count(Qwen2ForCausalLM(cfg))}
        tokenizer = AutoTokenizer.from_pretrained(base)
        # workload a data: short arithmetic prompts
        a_path = data_dir / "a.jsonl"
        if not a_path.exists():
            rng = random.Random(seed + 1)
            rows = []
            for _ in range(512):
                q, a = _problem(rng)
                rows.append({"prompt": f"Q: {q}=\nA: ", "answer": a})
            a_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # workload b data: few-shot prompts (depend on the tokenizer: one file per model)
        b_path = data_dir / f"b-{name}.jsonl"
        if "b" in workloads and not b_path.exists():
            rng = random.Random(seed + 2)
            rows = []
            for _ in range(512):
                p, a = _few_shot_prompt(rng, tokenizer)
                rows.append({"prompt": p, "answer": a})
            b_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if "b" in workloads:
            sft_dir = workdir / "models" / f"{name}-sft"
            if not (sft_dir / "config.json").exists():
                _sft_warm_start(base, sft_dir, tokenizer, seed)
            facts[name]["sft_dir"] = str(sft_dir)
            lengths = [len(tokenizer(json.loads(line)["prompt"])["input_ids"])
                       for line in b_path.read_text().splitlines()]
            facts[name]["b_prompt_tokens_mean"] = statistics.mean(lengths)
            facts[name]["b_prompt_tokens_range"] = [min(lengths), max(lengths)]
    return facts


def _sft_warm_start(base: Path, out: Path, tokenizer, seed: int, steps: int = 300, batch: int = 16) -> None:
    """A short supervised warm start on the few-shot format, so accuracy is neither 0 nor 1."""
    import torch
    from transformers import AutoModelForCausalLM

    print(f"[prepare] SFT warm start of {base.name} ({steps} steps)", file=sys.stderr, flush=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(seed + 3)
    eos = tokenizer.eos_token_id
    for step in range(steps):
        seqs, masks = [], []
        for _ in range(batch):
            p, a = _few_shot_prompt(rng, tokenizer, target_tokens=rng.randint(40, 200))
            pi = tokenizer(p)["input_ids"]
            ci = tokenizer(f"<answer>{a}</answer>")["input_ids"] + [eos]
            seqs.append(pi + ci)
            masks.append([0] * len(pi) + [1] * len(ci))
        width = max(len(s) for s in seqs)
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        att = torch.zeros((batch, width), dtype=torch.long)
        lab = torch.full((batch, width), -100)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            lab[i, : len(s)] = torch.where(torch.tensor(m) == 1, torch.tensor(s), torch.tensor(-100))
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            print(f"[prepare]   sft step {step} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------------
# Workers: one tool, one cell, in its own process. Each returns per-step seconds and token counts.

def _peak_memory_mb() -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _prompt_tokens(tokenizer, prompts) -> int:
    return sum(len(tokenizer(p)["input_ids"]) for p in prompts)


def worker_policyopt(spec: dict) -> dict:
    from policyopt.recipes.grpo import GRPOConfig, run_grpo
    from policyopt.runtime.config import config_from_dict

    baseline = _peak_memory_mb()["peak_rss_mb"]
    total = spec["warmup"] + spec["steps"]
    cfg = {
        "output_dir": spec["output_dir"], "seed": spec["seed"], "steps": total,
        "prompts_per_step": PROMPTS_PER_STEP, "group_size": spec["G"],
        "sampling": {"max_new_tokens": spec["max_new_tokens"]},
        "model": {"name_or_path": spec["model_dir"]},
        "data": {"path": spec["data"], "eval_size": 0},
        "rewards": [{"function": f"{HERE}:{REWARDS[spec['workload']]}"}],
    }
    if spec["settings"] == "same":
        cfg.update({"beta": spec["beta"], "optim": {"lr": spec["lr"], "lr_schedule": "constant_with_warmup",
                                                    "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0},
                    "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                    "loss_aggregation": "seq_mean_token_mean", "scale_rewards": True, "eval_every": 0,
                    "tensorboard": False})
        cfg["model"].update({"dtype": "float32", "autocast": "off"})
        cfg["sampling"].update({"temperature": 1.0, "top_p": 1.0, "top_k": 0})
    config = config_from_dict(GRPOConfig, cfg)
    run_grpo(config)
    records = [json.loads(line) for line in (Path(spec["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "seconds_per_step" in r]
    return {
        "seconds": [r["seconds_per_step"] for r in records],
        "generation_seconds": [r["generation_seconds"] for r in records],
        "tokens": [r["tokens_per_second"] * r["seconds_per_step"] for r in records],
        "completion_length": [r["completion_length"] for r in records],
        "baseline_rss_mb": baseline,
        "effective_config": {k: getattr(config, k) for k in (
            "beta", "loss_aggregation", "update_epochs", "tensorboard")} | vars(config.optim)
        | {"dtype": config.model.dtype, "autocast": config.model.autocast, "sampling": vars(config.sampling)},
    }


def worker_trl(spec: dict) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    baseline = _peak_memory_mb()["peak_rss_mb"]
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.padding_side = "left"
    total = spec["warmup"] + spec["steps"]
    n = PROMPTS_PER_STEP * spec["G"]
    geometry = dict(output_dir=spec["output_dir"], max_steps=total, per_device_train_batch_size=n,
                    gradient_accumulation_steps=1, num_generations=spec["G"],
                    max_completion_length=spec["max_new_tokens"], seed=spec["seed"],
                    # bookkeeping only (outside the timed window): per-step logs, no saving, no reporting
                    logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    if spec["settings"] == "same":
        args = GRPOConfig(**geometry, beta=spec["beta"], learning_rate=spec["lr"], lr_scheduler_type="constant",
                          warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, epsilon=0.2, epsilon_high=0.2,
                          loss_type="grpo", scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0,
                          bf16=False, fp16=False, gradient_checkpointing=False, num_iterations=1, use_cpu=True)
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    else:
        # use_cpu is the one switch TRL needs to run at all on a machine without a GPU (its bf16 default
        # otherwise refuses to start); everything else stays TRL's default.
        import torch as _t
        args = GRPOConfig(**geometry, **({} if _t.cuda.is_available() else {"use_cpu": True}))
        model = spec["model_dir"]  # TRL loads it with its own model_init_kwargs
    reward = globals()[REWARDS[spec["workload"]]]
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)

    gen_seconds: list[float] = []
    original_generate = trainer._generate

    def timed_generate(*a, **k):
        t = time.perf_counter()
        try:
            return original_generate(*a, **k)
        finally:
            gen_seconds.append(time.perf_counter() - t)

    trainer._generate = timed_generate

    timer = step_timer("completions/mean_length")
    trainer.add_callback(timer)
    trainer.train()
    calls = [json.loads(line) for line in Path(os.environ["BENCH_REWARD_LOG"]).read_text().splitlines()]
    tokens = [_prompt_tokens(tokenizer, c["prompts"]) + sum(c["completion_tokens"]) for c in calls]
    a = trainer.args
    policy = trainer.model
    effective = {k: getattr(a, k) for k in (
        "bf16", "fp16", "gradient_checkpointing", "learning_rate", "lr_scheduler_type", "warmup_steps", "beta",
        "loss_type", "scale_rewards", "num_iterations", "epsilon", "epsilon_high", "temperature", "top_p", "top_k",
        "optim", "weight_decay", "max_grad_norm", "use_cpu", "use_transformers_paged", "cache_implementation",
        "mask_truncated_completions", "disable_dropout", "steps_per_generation", "generation_batch_size")
        if hasattr(a, k)}
    effective["optim"] = str(effective.get("optim"))
    effective["model_param_dtype"] = str(next(policy.parameters()).dtype)
    effective["model_gradient_checkpointing"] = bool(getattr(policy, "is_gradient_checkpointing", False))
    effective["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__,
                             "torch": torch.__version__}
    return {
        "seconds": timer.seconds,
        "generation_seconds": gen_seconds,
        "tokens": tokens,
        "completion_length": [l["completions/mean_length"] for l in timer.logs],
        "trl_frac_reward_zero_std": [l.get("frac_reward_zero_std") for l in timer.logs],
        "baseline_rss_mb": baseline,
        "effective_config": effective,
    }


def worker_bare(spec: dict) -> dict:
    """The lower bound: KV-cache sampling, one forward+backward over the same tokens, AdamW. No framework."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from policyopt.models.loading import cache_keyword
    from transformers import DynamicCache

    baseline = _peak_memory_mb()["peak_rss_mb"]
    torch.manual_seed(spec["seed"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    ref = None
    if spec["beta"] > 0:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0, foreach=True)
    kw = cache_keyword(model)
    G, T, eos, pad = spec["G"], spec["max_new_tokens"], tokenizer.eos_token_id, tokenizer.pad_token_id
    reward_fn = globals()[REWARDS[spec["workload"]]]
    seconds, gen_seconds, tokens, lengths_out = [], [], [], []
    for step in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        batch = rows[(step * PROMPTS_PER_STEP) % len(rows):][:PROMPTS_PER_STEP]
        enc = [tokenizer(r["prompt"])["input_ids"] for r in batch]
        P = max(len(e) for e in enc)
        p_ids = torch.tensor([[pad] * (P - len(e)) + e for e in enc])
        p_mask = torch.tensor([[0] * (P - len(e)) + [1] * len(e) for e in enc])
        with torch.no_grad():
            model.eval()
            cache = DynamicCache()
            pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=pos, use_cache=True,
                        logits_to_keep=1, **{kw: cache})
            cache.batch_repeat_interleave(G)
            logits = out.logits[:, -1].repeat_interleave(G, 0)
            attn = p_mask.repeat_interleave(G, 0)
            nxt = pos[:, -1].repeat_interleave(G, 0) + 1
            n = len(batch) * G
            done = torch.zeros(n, dtype=torch.bool)
            toks = []
            for t in range(T):
                tok = torch.multinomial(logits.float().softmax(-1), 1).squeeze(-1)
                tok = tok.masked_fill(done, pad)
                toks.append(tok)
                done = done | (tok == eos)
                if t == T - 1 or bool(done.all()):
                    break
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
                logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=nxt[:, None],
                               use_cache=True, **{kw: cache}).logits[:, -1]
                nxt = nxt + 1
        c_ids = torch.stack(toks, 1)
        is_eos = (c_ids == eos).long()
        c_mask = ((is_eos.cumsum(1) - is_eos) == 0).long()  # up to and including the first EOS
        gen_seconds.append(time.perf_counter() - t0)
        texts = tokenizer.batch_decode(c_ids.masked_fill(c_mask == 0, pad), skip_special_tokens=True)
        prompts = [r["prompt"] for r in batch for _ in range(G)]
        rewards = torch.tensor(reward_fn(prompts, texts, answer=[r["answer"] for r in batch for _ in range(G)],
                                         completion_ids=[[0] * int(m) for m in c_mask.sum(1)]), dtype=torch.float32)
        grouped = rewards.view(-1, G)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        model.train()
        ids = torch.cat([p_ids.repeat_interleave(G, 0), c_ids], 1)
        mask = torch.cat([p_mask.repeat_interleave(G, 0), c_mask], 1)
        posn = (mask.cumsum(-1) - 1).clamp(min=0)
        L = c_ids.size(1)

        def logp_of(m):
            lg = m(input_ids=ids, attention_mask=mask, position_ids=posn, logits_to_keep=L + 1).logits[:, :-1]
            return torch.log_softmax(lg.float(), -1).gather(-1, c_ids[..., None]).squeeze(-1)

        logp = logp_of(model)
        per_token = -torch.exp(logp - logp.detach()) * adv[:, None]
        if ref is not None:
            with torch.no_grad():
                ref_logp = logp_of(ref)
            d = ref_logp - logp
            per_token = per_token + spec["beta"] * (torch.exp(d) - d - 1)
        cm = c_mask.float()
        loss = ((per_token * cm).sum(1) / cm.sum(1).clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        tokens.append(int(p_mask.sum()) * G + int(c_mask.sum()))
        lengths_out.append(float(c_mask.sum(1).float().mean()))
    return {"seconds": seconds, "generation_seconds": gen_seconds, "tokens": tokens,
            "completion_length": lengths_out, "baseline_rss_mb": baseline, "effective_config": {"dtype": "float32"}}


WORKERS = {"policyopt": worker_policyopt, "trl": worker_trl, "bare": worker_bare}


def run_worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    result = WORKERS[spec["tool"]](spec)
    result.update(_peak_memory_mb())
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------
# Driver.

def _zero_std_fraction(reward_log: Path, G: int) -> float | None:
    if not reward_log.exists():
        return None
    groups = zero = 0
    for line in reward_log.read_text().splitlines():
        rewards = [r if r is not None else float("nan") for r in json.loads(line)["rewards"]]
        for i in range(0, len(rewards), G):
            g = rewards[i: i + G]
            groups += 1
            zero += max(g) - min(g) == 0
    return zero / groups if groups else None


def run_cell(workdir: Path, tool: str, settings: str, workload: str, model: str, facts: dict, args,
             G: int | None = None, max_new_tokens: int | None = None, tag: str = "") -> dict:
    G = G or args.group_size
    max_new_tokens = max_new_tokens or (args.fixed_tokens if workload == "a" else args.realistic_tokens)
    name = f"{workload}-{model}-{tool}-{settings}{tag}"
    cell_dir = workdir / "runs" / name
    if cell_dir.exists():
        import shutil

        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    model_dir = facts[model]["fixed_dir"] if workload == "a" else facts[model]["sft_dir"]
    data = workdir / "data" / ("a.jsonl" if workload == "a" else f"b-{model}.jsonl")
    spec = {"tool": tool, "settings": settings, "workload": workload, "model_dir": model_dir, "data": str(data),
            "G": G, "max_new_tokens": max_new_tokens, "beta": args.beta, "lr": args.lr, "seed": args.seed,
            "steps": args.steps, "warmup": args.warmup, "output_dir": str(cell_dir / "out"),
            "result_path": str(cell_dir / "result.json")}
    reward_log = cell_dir / "rewards.jsonl"
    env = dict(os.environ, BENCH_REWARD_LOG=str(reward_log), TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    spec["threads"] = args.threads
    print(f"[run] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE), "_worker", json.dumps(spec)], env=env,
                          stdout=open(cell_dir / "stdout.log", "w"), stderr=open(cell_dir / "stderr.log", "w"))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (cell_dir / "stderr.log").read_text()[-3000:]
        print(f"[run] {name} FAILED (rc {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return {"name": name, "tool": tool, "settings": settings, "workload": workload, "model": model,
                "G": G, "max_new_tokens": max_new_tokens, "error": tail}
    raw = json.loads((cell_dir / "result.json").read_text())
    w = args.warmup
    secs, gens, toks = raw["seconds"][w:], raw["generation_seconds"][w:], raw["tokens"][w:]
    med = statistics.median(secs)
    cell = {
        "name": name, "tool": tool, "settings": settings, "workload": workload, "model": model, "G": G,
        "max_new_tokens": max_new_tokens, "steps_measured": len(secs), "wall_seconds": wall,
        "median_step_s": med, "min_step_s": min(secs), "max_step_s": max(secs),
        "median_generation_s": statistics.median(gens) if gens else None,
        "generation_share": statistics.median([g / s for g, s in zip(gens, secs)]) if gens else None,
        "tokens_per_s": statistics.median([t / s for t, s in zip(toks, secs)]),
        "tokens_per_step": statistics.median(toks),
        "completion_length_mean": statistics.mean(raw["completion_length"][w:]) if raw["completion_length"] else None,
        "frac_zero_std_groups": _zero_std_fraction(reward_log, G),
        "peak_rss_mb": raw["peak_rss_mb"], "baseline_rss_mb": raw["baseline_rss_mb"],
        "cuda_max_allocated_mb": raw.get("cuda_max_allocated_mb"),
        "effective_config": raw.get("effective_config"), "raw_seconds": raw["seconds"],
    }
    if "trl_frac_reward_zero_std" in raw:
        cell["trl_logged_frac_zero_std"] = raw["trl_frac_reward_zero_std"]
    print(f"[run] {name}: median {med:.3f}s/step, {cell['tokens_per_s']:.0f} tok/s, "
          f"gen share {cell['generation_share'] or 0:.2f}, peak RSS {cell['peak_rss_mb']:.0f} MB, "
          f"wall {wall:.0f}s", file=sys.stderr, flush=True)
    return cell


def markdown(results: dict) -> str:
    cells = [c for c in results["cells"] if "error" not in c and not c["name"].endswith("-scaling")
             and "-scal-" not in c["name"]]
    lines = ["| workload | model | settings | tool | median s/step | tokens/s | generation share | answer len | "
             "zero-std groups | peak RSS MB | ratio policyopt/tool (s/step) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        po = next((x for x in cells if x["tool"] == "policyopt" and x["workload"] == c["workload"]
                   and x["model"] == c["model"] and x["settings"] == c["settings"]), None)
        if c["settings"] == "defaults" and c["tool"] == "bare":
            po = None
        ratio = f"{po['median_step_s'] / c['median_step_s']:.2f}" if po and c["tool"] != "policyopt" else ""
        zs = c["frac_zero_std_groups"]
        lines.append(
            f"| {c['workload']} | {c['model']} ({results['models'][c['model']]['parameters'] / 1e6:.2f}M) | "
            f"{c['settings']} | {c['tool']} | {c['median_step_s']:.3f} | {c['tokens_per_s']:.0f} | "
            f"{c['generation_share']:.2f} | {c['completion_length_mean']:.1f} | "
            f"{'' if zs is None else f'{zs:.2f}'} | {c['peak_rss_mb']:.0f} | {ratio} |")
    for c in results["cells"]:
        if "error" in c:
            lines.append(f"| {c['workload']} | {c['model']} | {c['settings']} | {c['tool']} | FAILED | | | | | | |")
    scaling = [c for c in results["cells"] if "-scal-" in c["name"] and "error" not in c]
    if scaling:
        tools = [t for t in ("policyopt", "trl", "bare") if any(c["tool"] == t for c in scaling)]
        lines += ["", "Scaling (same settings, workload a shape, model small): median s/step, peak RSS MB", "",
                  "| G | answer tokens | " + " | ".join(f"{t} s/step | {t} MB" for t in tools)
                  + "".join(f" | policyopt/{t}" for t in tools[1:]) + " |",
                  "|---:|---:|" + "---:|---:|" * len(tools) + "---:|" * (len(tools) - 1)]
        for G, T in sorted({(c["G"], c["max_new_tokens"]) for c in scaling}):
            row = {c["tool"]: c for c in scaling if (c["G"], c["max_new_tokens"]) == (G, T)}
            cols = [f"{row[t]['median_step_s']:.3f} | {row[t]['peak_rss_mb']:.0f}" if t in row else " | "
                    for t in tools]
            ratios = [f"{row['policyopt']['median_step_s'] / row[t]['median_step_s']:.2f}"
                      if "policyopt" in row and t in row else "" for t in tools[1:]]
            lines.append(f"| {G} | {T} | " + " | ".join(cols) + "".join(f" | {r}" for r in ratios) + " |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        return run_worker(sys.argv[2])
    if len(sys.argv) > 2 and sys.argv[1] == "_prepare":
        spec = json.loads(sys.argv[2])
        facts = prepare(Path(spec["workdir"]), spec["models"], spec["workloads"], spec["seed"])
        Path(spec["out"]).write_text(json.dumps(facts))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["a", "b", "all"], default="all")
    parser.add_argument("--model", choices=["small", "large", "all"], default="small")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per cell")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per cell, not measured")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--fixed-tokens", type=int, default=32, help="workload a: new tokens per answer")
    parser.add_argument("--realistic-tokens", type=int, default=64, help="workload b: max new tokens")
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient in the same-settings runs")
    parser.add_argument("--lr", type=float, default=1e-5, help="constant learning rate in the same-settings runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-bare", action="store_true")
    parser.add_argument("--skip-defaults", action="store_true", help="only the same-settings comparison")
    parser.add_argument("--skip-same", action="store_true", help="only the each-tool's-defaults comparison")
    parser.add_argument("--scaling", action="store_true",
                        help="also G in {4,8,16} x answer length in {16,64,256} on the small model, for --scaling-tools")
    parser.add_argument("--scaling-tools", nargs="+", default=["policyopt", "trl"], choices=["policyopt", "trl", "bare"])
    parser.add_argument("--scaling-steps", type=int, default=10, help="measured steps per scaling cell (after --warmup)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per worker (default: torch's own choice). On a shared CPU use 1: "
                             "OpenMP threads fighting other processes for cores make every tool tens of times slower")
    parser.add_argument("--workdir", default="/tmp/bench")
    parser.add_argument("--output", default=None, help="results JSON (default: WORKDIR/trl_compare.json)")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workloads = ["a", "b"] if args.workload == "all" else [args.workload]
    models = ["small", "large"] if args.model == "all" else [args.model]
    if not args.skip_trl:
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            parser.error("TRL is not installed: pip install trl==1.16.0 (or pass --skip-trl)")
    # Preparation runs in its own process: the driver must stay small, because Linux carries a parent's
    # RSS high-water mark into the children it starts (ru_maxrss would be floored at the driver's peak).
    workdir.mkdir(parents=True, exist_ok=True)
    facts_path = workdir / "facts.json"
    prep = {"workdir": str(workdir), "models": sorted(set(models) | ({"small"} if args.scaling else set())),
            "workloads": workloads, "seed": args.seed, "out": str(facts_path)}
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    subprocess.run([sys.executable, str(HERE), "_prepare", json.dumps(prep)], check=True, env=env)
    facts = json.loads(facts_path.read_text())
    tools = ["policyopt"] + ([] if args.skip_trl else ["trl"]) + ([] if args.skip_bare else ["bare"])
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "models": facts,
               "settings": {k: v for k, v in vars(args).items()}, "cpu_count": os.cpu_count(),
               "load_average_start": os.getloadavg(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
               "cells": []}
    for workload in workloads:
        for model in models:
            for settings in ([] if args.skip_same else ["same"]) + ([] if args.skip_defaults else ["defaults"]):
                for tool in tools:
                    if tool == "bare" and settings == "defaults":
                        continue
                    results["cells"].append(run_cell(workdir, tool, settings, workload, model, facts, args))
    if args.scaling:
        saved = args.steps
        args.steps = args.scaling_steps
        for tool in [t for t in args.scaling_tools if t in tools]:
            for G in (4, 8, 16):
                for T in (16, 64, 256):
                    results["cells"].append(run_cell(workdir, tool, "same", "a", "small", facts, args, G=G,
                                                     max_new_tokens=T, tag=f"-scal-G{G}-T{T}"))
        args.steps = saved
    results["load_average_end"] = os.getloadavg()
    table = markdown(results)
    results["markdown"] = table
    out = Path(args.output) if args.output else workdir / "trl_compare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(table)
    print(f"\nresults: {out}; load average start {results['load_average_start']}, end {results['load_average_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
