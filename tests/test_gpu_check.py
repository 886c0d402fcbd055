"""benchmarks/gpu_check.py's CPU parts: its statistical test of a sampler, its model, its tiny mode end to end
(the GPU checks skip with a line saying why; they run where CUDA, vllm and deepspeed are)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def _draws(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, -1)
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)


def test_the_pit_test_accepts_the_right_distribution_and_rejects_a_wrong_one():
    logits = torch.randn(40, 50, 30, generator=torch.Generator().manual_seed(0)) * 2  # 40 sequences x 50 positions
    logprobs = [torch.log_softmax(l, -1) for l in logits]
    right = [_draws(l, 1.0, i) for i, l in enumerate(logits)]
    ok = gpu_check.pit_test(logprobs, right)
    assert ok["tokens"] == 2000 and ok["p"] > 1e-3 and ok["ks_p"] > 1e-3 and abs(ok["logprob_z"]) < 4
    hotter = [_draws(l, 1.3, i) for i, l in enumerate(logits)]  # a sampler off by its temperature
    bad = gpu_check.pit_test(logprobs, hotter)
    assert bad["ks_p"] < 1e-6 and bad["logprob_z"] < -4 and bad["p"] < 1e-6
    stale = [_draws(l + torch.randn(l.shape, generator=torch.Generator().manual_seed(9)), 1.0, i) for i, l in enumerate(logits)]
    assert gpu_check.pit_test(logprobs, stale)["p"] < 1e-6  # a sampler with other weights


def test_arguments_and_model_sizes():
    args = gpu_check.parse_args([])
    assert (args.size, args.vocab, args.prompts, args.tokens) == ("0.5b", 8000, 64, 32)
    assert gpu_check.parse_args(["--tiny"]).size == "tiny"
    tokenizer = gpu_check.build_tokenizer(300, problems=50)
    config = gpu_check.build_llama(tokenizer, "tiny").config
    assert config.max_position_embeddings == 512 and config.vocab_size == len(tokenizer)
    shape = gpu_check.SIZES["0.5b"]  # ~0.47B parameters at an 8k vocabulary, the paper's 2,048-position context
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    assert 0.4e9 < n * (4 * h * h + 3 * h * i) + 2 * 8000 * h < 0.6e9 and shape["max_position_embeddings"] == 2048


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny mode's skip line is for machines without CUDA")
def test_tiny_mode_runs_the_sampler_check_on_cpu_and_skips_the_gpu_checks(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--tiny", "--prompts", "4", "--samples", "2", "--tokens", "8", "--out", str(out)]) == 0
    records = {r["check"]: r for r in json.loads(out.read_text())}
    assert "no CUDA device" in records["gpu"]["skipped"]
    assert records["sampler/before"]["tokens"] > 0 and records["total"]["passed"]
    assert "GPU checks skipped" in capsys.readouterr().out
