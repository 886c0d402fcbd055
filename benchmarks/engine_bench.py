"""Sampling throughput: the torch engine against transformers' model.generate(), measured side by side.

    python benchmarks/engine_bench.py            # the built-in default policy (built on first use)
    python benchmarks/engine_bench.py --quick    # fewer repeats

Workloads, all on arith test prompts with the training sampler's settings (T = 0.6, top-p 1, the task's
token budget; completions end at EOS at whatever length the policy chooses, 10-60 tokens):
- rollouts: 64 and 256 distinct prompts × 1 sample, and 32 prompts × 8 samples (a GRPO / VinePPO group);
- MC values (VinePPO): K = 9 continuations from every step boundary of 64 sampled responses; the
  engine with prefix sharing, the engine prefilling every sample's prefix, and generate().
Every row is the best of ``--repeats`` runs (runs of different samplers interleave, so a busy
machine slows them alike). Effective FLOP/s = 2 × parameters × tokens run through the model / time,
against the best fp32 matmul FLOP/s this script measures on this machine (large square matmuls, and
the decode-step shape [256, hidden] × [hidden, intermediate] of this model).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from rlzoo.engine import SamplingParams
from rlzoo.engine.torch_engine import TorchEngine


def matmul_flops(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """Best fp32 FLOP/s of [m, k] × [k, n] over ~``seconds`` of repeats."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best, spent = float("inf"), 0.0
    reps = max(1, int(2e8 / (m * k * n)))
    while spent < seconds:
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed / reps), spent + elapsed
    return 2 * m * k * n / best


def generate_baseline(model, tokenizer, prompts: list[list[int]], params: SamplingParams, batch_prompts: int):
    """model.generate() on left-padded batches of ``batch_prompts`` prompts × params.n samples.

    Returns (tokens generated up to and including EOS, tokens run through the model, seconds).
    """
    eos, generated, forward = tokenizer.eos_token_id, 0, 0
    torch.manual_seed(params.seed)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_prompts):
        batch = tokenizer.pad({"input_ids": prompts[i : i + batch_prompts]}, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=params.temperature > 0, temperature=params.temperature or None,
                                 top_p=params.top_p, top_k=0, max_new_tokens=params.max_new_tokens,
                                 num_return_sequences=params.n, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        new = out[:, batch["input_ids"].shape[1] :]  # [rows, steps]
        ended = (new == eos).int().cumsum(-1)  # tokens after the first EOS are padding
        generated += int(((ended == 0) | ((ended == 1) & (new == eos))).sum())
        forward += new.shape[0] * (batch["input_ids"].shape[1] + new.shape[1] - 1)  # prefill + every step, all rows
    return generated, forward, time.perf_counter() - start


def engine_run(engine: TorchEngine, prompts, params):
    engine.stats.__init__()
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return engine.stats.tokens_generated, engine.stats.forward_tokens, seconds, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default="default", help="'default' (built on first use) or a saved model folder")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the best is reported")
    parser.add_argument("--quick", action="store_true", help="one run per row")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)

    from rlzoo.policy import load_policy
    from rlzoo.tasks import get_task

    console = Console(width=200)
    model, tokenizer = load_policy(args.policy)
    task = get_task("arith")
    config = model.config
    params_count = sum(p.numel() for p in model.parameters())
    problems = task.problems("test")
    prompt_ids = [tokenizer(task.prompt(p))["input_ids"] for p in problems]
    rollout = SamplingParams(n=1, temperature=0.6, max_new_tokens=task.max_new_tokens, seed=0)

    square = matmul_flops(1024, 1024, 1024, seconds=2.0)
    decode_shape = matmul_flops(256, config.hidden_size, config.intermediate_size, seconds=2.0)
    peak = max(square, decode_shape)  # the best fp32 matmul rate measured here: the ceiling for "% of peak"

    # MC states: every step boundary of 64 sampled responses (prompt + the steps before it).
    responses = TorchEngine(model, tokenizer).generate(prompt_ids[:64], rollout)
    states = []
    for prompt, group in zip(prompt_ids[:64], responses):
        completion = group[0]
        for start in task.split_steps(completion.text):  # char offsets = token offsets for the char tokenizer
            states.append(prompt + completion.token_ids[:start])
    mc = SamplingParams(n=9, temperature=0.6, max_new_tokens=task.max_new_tokens, seed=1)

    workloads = [  # (name, prompts, params, engine batch, generate() prompts per batch)
        ("rollouts 64 prompts × 1", prompt_ids[:64], rollout, 64, 64),
        ("rollouts 256 prompts × 1", prompt_ids[64:320], rollout, 256, 256),
        ("rollouts 32 prompts × 8", prompt_ids[:32], SamplingParams(**{**rollout.__dict__, "n": 8}), 256, 32),
        (f"MC values: {len(states)} states × 9", states, mc, 256, 28),
    ]
    rows = []
    for name, prompts, params, batch, generate_batch in workloads:
        samplers = {
            "model.generate()": lambda: generate_baseline(model, tokenizer, prompts, params, generate_batch)[:3],
            "engine": lambda: engine_run(TorchEngine(model, tokenizer, max_batch_size=batch), prompts, params)[:3],
        }
        if name.startswith("MC"):
            samplers["engine, no prefix sharing"] = lambda: engine_run(
                TorchEngine(model, tokenizer, max_batch_size=batch, share_prefixes=False), prompts, params)[:3]
            samplers["engine, max_batch_size 1024"] = lambda: engine_run(
                TorchEngine(model, tokenizer, max_batch_size=1024), prompts, params)[:3]
        best: dict[str, tuple] = {}
        for _ in range(repeats):
            for label, run in samplers.items():
                result = run()
                if label not in best or result[2] < best[label][2]:
                    best[label] = result
        baseline_seconds = best["model.generate()"][2]
        for label, (generated, forward, seconds) in best.items():
            flops = 2 * params_count * forward / seconds
            rows.append((name, label, len(prompts) * params.n, generated, forward, seconds, generated / seconds,
                         baseline_seconds / seconds, flops))

    table = Table(title=f"Sampling on this machine: {torch.get_num_threads()} torch threads, fp32, best of {repeats}")
    for column in ("workload", "sampler", "rows", "tokens generated", "forward tokens", "seconds", "generated tok/s",
                   "speed-up vs generate()", "effective GFLOP/s", "% of matmul peak"):
        table.add_column(column, justify="left" if column in ("workload", "sampler") else "right")
    for name, label, n_rows, generated, forward, seconds, tps, speedup, flops in rows:
        table.add_row(name, label, str(n_rows), f"{generated:,}", f"{forward:,}", f"{seconds:.2f}", f"{tps:,.0f}",
                      f"{speedup:.2f}x", f"{flops / 1e9:.1f}", f"{100 * flops / peak:.0f}%")
    console.print(f"policy {args.policy!r}: Llama hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                  f"{config.num_attention_heads} heads, intermediate {config.intermediate_size}, vocab {config.vocab_size}, "
                  f"{params_count / 1e6:.2f}M parameters")
    console.print(f"sampling: T = 0.6, top-p 1, max_new_tokens {task.max_new_tokens} (arith), EOS ends a completion; "
                  f"mean response {sum(len(g[0].token_ids) for g in responses) / len(responses):.1f} tokens, "
                  f"{len(states) / 64:.1f} step boundaries per response")
    console.print(f"fp32 matmul on this machine: {square / 1e9:.0f} GFLOP/s at 1024³, "
                  f"{decode_shape / 1e9:.0f} GFLOP/s at a decode step's [256, {config.hidden_size}] × "
                  f"[{config.hidden_size}, {config.intermediate_size}]")
    console.print(table)


if __name__ == "__main__":
    main()
