"""benchmarks/gpu_compare.py in its CPU smoke mode (--tiny --device cpu): it runs end to end and reports
every number for each tool (TRL only where it is installed: pip install trl==1.16.0)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("vllm.entrypoints", reason="vLLM is not installed (the vLLM tests run in .venv-vllm: "
                    "scripts/setup_vllm.sh)")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_compare.py"


@pytest.mark.slow
def test_the_benchmark_runs_at_tiny_size_on_a_cpu(tmp_path):
    tools = "policyopt,trl" if importlib.util.find_spec("trl") else "policyopt"
    spec = importlib.util.spec_from_file_location("gpu_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "result.json"
    assert module.main(["--tiny", "--device", "cpu", "--tools", tools, "--steps", "1", "--warmup", "1",
                        "--prompts", "2", "--G", "4", "--max-new-tokens", "8", "--workdir", str(tmp_path / "w"),
                        "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    for tool in tools.split(","):
        numbers = results["tools"][tool]
        assert numbers["seconds_per_step"] > 0 and numbers["tokens_per_second"] > 0
        assert numbers["peak_memory_mib"] > 0 and numbers["mfu"] is None  # no peak FLOP/s known for a CPU
    assert results["tools"]["policyopt"]["mismatch_abs_logp_diff"] < 1e-4  # fp32 engine vs trainer
