"""GPU check (issue 12): one script, under 8 minutes on one GPU, on a randomly initialised ~0.5B Llama built here
(no hub download), over a byte-level BPE vocabulary trained here on the packaged GSM8K and MATH text.

    python benchmarks/gpu_check.py --out gpu_check.json     # one GPU with vllm and deepspeed (the `gpu` extra)
    python benchmarks/gpu_check.py --tiny                   # CPU: a tiny model, the torch engine, the same test

Checks, each reported as a JSON record (and a line on stdout):
1. sampler: the engine samples from the distribution the trainer's forward computes. Responses are sampled at
   T = 0.7; the trainer's forward (``rlzoo.ppo``'s temperature-scaled softmax) gives each response position's
   distribution p; every sampled token x becomes a randomised PIT value u = F(x-) + U * p(x) (F: the mass of
   the tokens more likely than x), uniform on [0, 1] exactly when x ~ p, and a Kolmogorov-Smirnov test checks
   them; a z-score compares the sampled tokens' summed log-probability with its expectation, -H(p). Run before a weight change, after one without a sync (the
   negative control: a stale vLLM copy must be rejected) and after the sync.
2. sync: seconds per ``engine.sync_weights`` (the policy's tensors into vLLM's model, in place), median of 5.
3.+4. vineppo: 2 iterations of ``rlzoo train --algo vineppo`` on math with the paper's lengths (2,048-position
   context, 1,024 new tokens, K = 9), vLLM rollouts, the policy updated by a bf16 DeepSpeed ZeRO-2 step
   (benchmarks/deepspeed/zero2.json); reports its stage times, tokens and whether the update stayed finite.
   Smaller than the paper's batch (8 prompts x 8 samples, 8 valued steps per response) to fit the time.

Without CUDA (or without vllm / deepspeed) the GPU checks are skipped with a line saying why; ``--tiny`` runs
check 1 on the CPU with the torch engine (which samples from the trained module itself: no sync to check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Model shapes: "0.5b" is Llama-shaped, ~0.47B parameters with an 8k vocabulary; "tiny" runs in seconds on a CPU.
SIZES = {
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=2048),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=512),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: the sampler check with the torch engine")
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary size (default: 8000, tiny 1000)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts of the sampler check (default: 64, tiny 8)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt of the sampler check")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per sample of the sampler check (default: 32, tiny 16)")
    parser.add_argument("--alpha", type=float, default=1e-3, help="a check fails when its p-value is below this")
    parser.add_argument("--skip-vineppo", action="store_true", help="only the sampler and sync checks")
    parser.add_argument("--out", type=Path, default=None, help="write the records here as JSON")
    args = parser.parse_args(argv)
    args.size = "tiny" if args.tiny else "0.5b"
    args.vocab = args.vocab or (1000 if args.tiny else 8000)
    args.prompts = args.prompts or (8 if args.tiny else 64)
    args.tokens = args.tokens or (16 if args.tiny else 32)
    return args


def build_tokenizer(vocab_size: int, problems: int = 2000):
    """Byte-level BPE (merges across newlines, as Llama-3's) trained on the packaged GSM8K and MATH train text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from rlzoo.tasks import get_task

    texts = []
    for name in ("gsm8k", "math"):
        task = get_task(name)
        texts += [task.prompt(p) + task.target(p) for p in task.problems("train")[:problems]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", backend.token_to_id("<|bos|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
                                   padding_side="left", clean_up_tokenization_spaces=False)


def build_llama(tokenizer, size: str, seed: int = 0):
    """A randomly initialised LlamaForCausalLM of ``SIZES[size]`` over ``tokenizer`` (float32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **SIZES[size])
    return LlamaForCausalLM(config)


def pit_test(logprobs: list[torch.Tensor], tokens: list[torch.Tensor], seed: int = 0) -> dict:
    """Whether ``tokens`` were drawn from the distributions ``logprobs`` give. logprobs[i]: [T_i, V] log-probabilities
    of each position of sequence i; tokens[i]: [T_i] the tokens drawn there. Returns the number of tokens, the
    Kolmogorov-Smirnov p-value of their randomised PIT values against U(0, 1) (tokens ordered by probability), the
    z-score of their summed log-probability against its expectation (the summed -entropy) and variance under the
    null, and ``p``: the two combined (Bonferroni), which a check compares with its alpha."""
    from scipy import stats

    generator = torch.Generator().manual_seed(seed)
    pit, total, mean, var = [], 0.0, 0.0, 0.0
    for lp, x in zip(logprobs, tokens):
        lp, x = lp.double().cpu(), x.long().cpu()
        p = lp.exp()  # [T, V]
        # Tokens ordered from most to least likely: a sampler too hot, too cold or with other weights moves mass
        # along this order, so the PIT values leave uniformity (in token-id order such shifts would largely cancel).
        sorted_p, order = p.sort(-1, descending=True)
        rank = order.argsort(-1).gather(-1, x[:, None])  # [T, 1] position of x in that order
        below = (sorted_p.cumsum(-1) - sorted_p).gather(-1, rank).squeeze(-1)  # mass of the tokens more likely than x
        chosen = lp.gather(-1, x[:, None]).squeeze(-1)  # [T] log p(x)
        pit.append(below + torch.rand(len(x), generator=generator, dtype=torch.float64) * chosen.exp())
        plogp = torch.where(p > 0, p * lp, torch.zeros_like(p))
        mean += plogp.sum().item()  # E[log p(x)] = -H
        var += ((torch.where(p > 0, p * lp * lp, torch.zeros_like(p))).sum(-1) - plogp.sum(-1) ** 2).sum().item()
        total += chosen.sum().item()
    u = torch.cat(pit).clamp(0, 1).numpy() if pit else []
    ks_p = float(stats.kstest(u, "uniform").pvalue) if len(u) else float("nan")
    z = (total - mean) / math.sqrt(var) if var > 0 else 0.0
    return {"tokens": len(u), "ks_p": ks_p, "logprob_z": z,
            "p": min(1.0, 2 * min(ks_p, 2 * stats.norm.sf(abs(z))))}  # both tests, Bonferroni-corrected


def trainer_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """[len(response), V] log-probabilities the trainer's forward gives each response position (at ``temperature``)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + response], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # [T, V]: position t predicts token t
    return torch.log_softmax(logits / temperature, dim=-1)


def sampler_check(engine, model, prompts: list[list[int]], samples: int, tokens: int, seed: int, label: str) -> dict:
    """Sample from ``engine`` and test the tokens against ``model``'s forward (``pit_test``)."""
    from rlzoo.engine import SamplingParams

    temperature = 0.7
    params = SamplingParams(n=samples, temperature=temperature, top_p=1.0, max_new_tokens=tokens, seed=seed)
    completions = engine.generate(prompts, params)
    logprobs, drawn = [], []
    for prompt, group in zip(prompts, completions):
        for c in group:
            if c.token_ids:
                logprobs.append(trainer_logprobs(model, prompt, c.token_ids, temperature).cpu())
                drawn.append(torch.tensor(c.token_ids))
    return {"check": f"sampler/{label}", **pit_test(logprobs, drawn, seed)}


def perturb(model, seed: int, scale: float = 0.02) -> None:
    """A weight change like an update's, large enough that a stale sampler is visibly off."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=generator).to(p) * scale)


def gpu_missing() -> str:
    """Why the GPU checks cannot run here ("" when they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    for module in ("vllm", "deepspeed"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'rlzoo-llm[gpu]')"
    return ""


def vineppo_check(folder: str, work: Path) -> dict:
    """2 iterations of vineppo on math with the paper's lengths, vLLM rollouts and a bf16 ZeRO-2 update."""
    import gin

    from rlzoo import runs
    from rlzoo.config import apply_gin
    from rlzoo.train import TrainConfig, train

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29517")})  # a one-process launch, as DeepSpeed wants
    gin.clear_config()
    apply_gin([], [
        "train.algo = 'vineppo'", "train.task = 'math'", f"train.model = '{folder}'", "train.engine = 'vllm'",
        f"train.deepspeed_config = '{REPO / 'benchmarks/deepspeed/zero2.json'}'", "train.iterations = 2",
        "train.max_new_tokens = 1024", "train.prompts_per_iteration = 8", "vineppo.group_size = 8", "vineppo.k = 9",
        "vineppo.max_valued_steps = 8", "train.eval_every = 100", "train.eval_samples = 1", "train.eval_train_problems = 8",
        "train.eval_test_problems = 8", "ppo.epochs = 2", "ppo.minibatches = 4", "ppo.micro_batch_size = 8",
        "train.checkpoint_every = 100", "train.lr = 1e-6"])
    started = time.perf_counter()
    run_dir = train(work / "vineppo", TrainConfig(), command="benchmarks/gpu_check.py")
    records = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    info = runs.read_run(run_dir)
    last = records[-1] if records else {}
    keys = ("time/iteration", "time/generation", "time/mc", "time/update", "tokens_iter/policy", "tokens_iter/mc",
            "response/length_mean", "ppo/grad_norm", "credit/mc_states")
    return {"check": "vineppo", "status": info.get("status"), "iterations": len(records), "seconds": time.perf_counter() - started,
            "dropped_problems": info.get("dropped_problems"), **{k: last.get(k) for k in keys},
            "finite": all(math.isfinite(r.get("ppo/grad_norm", 0.0)) for r in records)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from rlzoo.engine.torch_engine import TorchEngine
    from rlzoo.tasks import encode_prompts, get_task

    records, failed = [], False

    def report(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)

    t0 = time.perf_counter()
    tokenizer = build_tokenizer(args.vocab, problems=300 if args.tiny else 2000)
    model = build_llama(tokenizer, args.size)
    report({"check": "model", "size": args.size, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(tokenizer), "context": model.config.max_position_embeddings, "seconds": time.perf_counter() - t0})
    task = get_task("gsm8k")
    prompts = encode_prompts(tokenizer, task, task.problems("test")[: args.prompts])
    missing = gpu_missing()

    if args.tiny or missing:
        if missing:
            report({"check": "gpu", "skipped": f"GPU checks skipped: {missing}"})
        engine = TorchEngine(model.eval(), tokenizer)
        for label, seed in (("before", 1), ("after_update", 2)):
            record = sampler_check(engine, model, prompts, args.samples, args.tokens, seed, label)
            failed |= record["p"] < args.alpha
            report(record)
            perturb(model, seed)  # the torch engine samples from the module itself: nothing to sync
    else:
        from rlzoo.engine.vllm_engine import VLLMEngine

        model = model.to("cuda", torch.bfloat16).eval()
        engine = VLLMEngine(model, tokenizer, gpu_memory_utilization=0.25, enforce_eager=False)
        before = sampler_check(engine, model, prompts, args.samples, args.tokens, 1, "before_sync")
        perturb(model, 1)
        stale = sampler_check(engine, model, prompts, args.samples, args.tokens, 2, "stale_copy_must_fail")
        seconds = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.sync_weights(model)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        after = sampler_check(engine, model, prompts, args.samples, args.tokens, 3, "after_sync")
        failed |= before["p"] < args.alpha or after["p"] < args.alpha or stale["p"] >= args.alpha
        for record in (before, stale, after):
            report(record)
        report({"check": "sync", "seconds_median": sorted(seconds)[2], "seconds": seconds,
                "gigabytes": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9})
        del engine
        if not args.skip_vineppo:
            with tempfile.TemporaryDirectory(prefix="rlzoo-gpu-check-") as work:
                folder = Path(work) / "model"
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
                del model
                torch.cuda.empty_cache()
                record = vineppo_check(str(folder), Path(work))
                failed |= record["status"] != "finished" or not record["finite"]
                report(record)
    report({"check": "total", "seconds": time.perf_counter() - t0, "passed": not failed})
    if args.out:
        args.out.write_text(json.dumps(records, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
