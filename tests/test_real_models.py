"""GSM8K and MATH with real subword tokenizers (issue 12): byte-level BPE vocabularies trained here on the packaged
GSM8K text (one merging across newlines, as Llama-3 / Qwen2 do; one split by GPT-2's regex), a tiny Llama and a
tiny GPT-2 with dropout, contexts of 256-512 positions. Step boundaries inside tokens, per-state MC budgets, long
prompts dropped at load, the prompt tokenization check, and every strategy end to end on both tasks."""

import bisect
import json

import pytest
import torch

from rlzoo import runs
from rlzoo.algorithms import ESTIMATORS, build_estimator
from rlzoo.cli import main
from rlzoo.engine import SamplingParams
from rlzoo.engine.torch_engine import TorchEngine
from rlzoo.errors import UserError
from rlzoo.policy import load_policy
from rlzoo.rollout import EstimatorContext, build_batch, remaining_budgets
from rlzoo.tasks import encode_prompts, fit_to_context, get_task, tokenization_mismatch
from real_models import bpe_tokenizer, save_model

CONFIGURABLE = {"ppo": "value_ppo"}  # estimator name -> its gin name, where they differ


@pytest.fixture(scope="module")
def newline_bpe():
    return bpe_tokenizer(newline_merges=True, problems=800)


@pytest.fixture(scope="module")
def regex_bpe():
    return bpe_tokenizer(newline_merges=False, problems=800)


@pytest.fixture(scope="module")
def llama(newline_bpe, tmp_path_factory):
    """A tiny Llama over the newline-merging vocabulary, 256 positions."""
    return save_model(tmp_path_factory.mktemp("llama"), "llama", newline_bpe, context=256)


@pytest.fixture(scope="module")
def gpt2(regex_bpe, tmp_path_factory):
    """A tiny GPT-2 over the GPT-2-regex vocabulary, 512 positions, with dropout as GPT-2 checkpoints have."""
    return save_model(tmp_path_factory.mktemp("gpt2"), "gpt2", regex_bpe, context=512, dropout=0.1)


# ------------------------------------------------------------------------------------------ step boundaries


def test_a_token_straddling_a_step_boundary_belongs_to_the_step_its_first_character_lies_in(newline_bpe):
    tokenizer, task = newline_bpe, get_task("gsm8k")
    straddling = 0
    for problem in task.problems("test")[:40]:
        prompt_ids = encode_prompts(tokenizer, task, [problem])[0]
        response = tokenizer(task.target(problem), add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(response)
        batch = build_batch(tokenizer, task, [problem], [prompt_ids], [[_completion(response, text)]], [1.0])
        char_starts = task.split_steps(text)
        # The reference's rule (VinePPO's _compute_token_advantages): a token takes the step of its first character.
        token_first_char = [len(tokenizer.decode(response[:i])) for i in range(len(response))]
        reference_step = [bisect.bisect_right(char_starts, c) - 1 for c in token_first_char]
        starts = [s - len(prompt_ids) for s in batch.step_starts[0]]
        ours = [bisect.bisect_right(starts, i) - 1 for i in range(len(response))]
        # Same partition of the tokens into steps (a step inside one token merges into the step before it).
        assert [ours[i] != ours[i - 1] for i in range(1, len(ours))] == [reference_step[i] != reference_step[i - 1]
                                                                         for i in range(1, len(ours))]
        for i, c in enumerate(token_first_char):  # tokens like ".\n" start in one step and end in the next
            end = c + len(tokenizer.decode(response[i : i + 1]))
            straddling += any(c < b < end for b in char_starts)
    assert straddling > 20  # the vocabulary really merges across step boundaries


def _completion(ids, text):
    from rlzoo.engine import Completion

    return Completion(token_ids=list(ids), text=text, finish_reason="stop")


# ------------------------------------------------------------------------------------------ per-state budgets


def test_the_engine_gives_each_prompt_its_own_budget(llama):
    policy, tokenizer = load_policy(llama)
    engine = TorchEngine(policy, tokenizer)
    prompts = [tokenizer("Janet has 3 apples.")["input_ids"], tokenizer("How many?")["input_ids"]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=4)
    out = engine.generate(prompts, params, budgets=[5, 12])
    for group, budget in zip(out, [5, 12]):
        for c in group:
            assert len(c.token_ids) <= budget and (c.finish_reason == "stop" or len(c.token_ids) == budget)
    assert any(len(c.token_ids) == 5 for c in out[0])  # a random model rarely stops: the budget cuts it
    # The prompt with the full budget samples what it samples without per-prompt budgets (its keys are its own).
    assert [c.token_ids for c in engine.generate(prompts, params)[1]] == [c.token_ids for c in out[1]]
    with pytest.raises(UserError, match="at least 1"):
        engine.generate(prompts, params, budgets=[0, 3])


def test_vineppo_continuations_get_the_remaining_response_budget_within_the_context(llama):
    policy, tokenizer = load_policy(llama)
    task, context = get_task("gsm8k"), 256
    problem = max(task.problems("test")[:200], key=lambda p: len(encode_prompts(tokenizer, task, [p])[0]))
    prompt = encode_prompts(tokenizer, task, [problem])[0]
    max_new = context - len(prompt)  # the response budget fills the context exactly
    response = tokenizer(task.target(problem), add_special_tokens=False)["input_ids"][: max_new - 1]
    states = [prompt + response[:r] for r in (0, len(response) // 2, len(response) - 1)]
    engine = TorchEngine(policy, tokenizer)
    seen = []
    generate = engine.generate
    engine.generate = lambda prompts, params, budgets=None: seen.append(budgets) or generate(prompts, params, budgets)
    ctx = EstimatorContext(policy=policy, tokenizer=tokenizer, engine=engine, task=task, model_path=llama,
                           sampling=SamplingParams(), device=torch.device("cpu"), seed=0)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=max_new, stop=task.stop, seed=1)
    values = ctx.values_by_rollouts(states, [problem] * 3, [len(prompt)] * 3, params)
    assert values.shape == (3,)
    assert seen == [[max_new - (len(s) - len(prompt)) for s in states]]  # what is left of the response budget
    assert all(len(s) + b == context for s, b in zip(states, seen[0]))
    with pytest.raises(UserError, match="exceeds the model's context"):  # the full budget from a late state: the old failure
        generate([states[-1]], params)
    # the reference's rule: min(max_new_tokens, context - state), here the same as the context caps both
    assert remaining_budgets(states, [len(prompt)] * 3, 10**6, context) == [context - len(s) for s in states]


# ------------------------------------------------------------------------------------------ fitting the task


def test_problems_whose_prompt_leaves_too_little_room_are_dropped_at_load(regex_bpe):
    task = get_task("math")
    problems = task.problems("train")[6500:7500]  # the longest prompt among them
    lengths = [len(ids) for ids in encode_prompts(regex_bpe, task, problems)]
    kept, dropped = fit_to_context(regex_bpe, task, problems, context=512, max_new_tokens=64)
    assert len(kept) + len(dropped) == len(problems) and dropped
    assert sorted(dropped) == sorted(p.id for p, n in zip(problems, lengths) if n + 64 > 512)
    assert "math/train/7002" in dropped  # the 4,341-character prompt of the issue
    relaxed, _ = fit_to_context(regex_bpe, task, problems, context=512, max_new_tokens=64, min_response_tokens=8)
    assert len(relaxed) == sum(n + 8 <= 512 for n in lengths) > len(kept)
    assert fit_to_context(regex_bpe, task, problems[:5], context=None, max_new_tokens=64) == (problems[:5], [])


def test_prompt_tokenization_mismatch_is_measured_for_the_model_at_hand(newline_bpe, regex_bpe):
    task = get_task("gsm8k")
    problems = task.problems("train")
    merged = tokenization_mismatch(newline_bpe, task, problems)
    assert merged["sampled"] == 64 and merged["alone"] > 0.9  # '?\n\nSolution:\n' is one token of the joint text
    assert merged["joint"] < merged["alone"]  # the prompt with the target's leading "\n" splits as in the joint text
    assert merged["example"][0][:1] == ["?"]
    split = tokenization_mismatch(regex_bpe, task, problems)
    assert split["alone"] == 0.0 and "example" not in split  # GPT-2's regex never merges across "Solution:" | "\n"
    prompt = encode_prompts(newline_bpe, task, problems[:1], "joint")[0]
    assert newline_bpe.decode(prompt, skip_special_tokens=True) == task.prompt(problems[0]) + "\n"


# ------------------------------------------------------------------------------------------ end to end

SMALL = ["train.prompts_per_iteration = 2", "train.max_new_tokens = 16", "train.eval_every = 100",
         "train.eval_samples = 1", "train.eval_train_problems = 2", "train.eval_test_problems = 2", "train.lr = 1e-3",
         "ppo.epochs = 1", "ppo.minibatches = 1", "vineppo.k = 2", "train.checkpoint_every = 10"]


def _train(run_dir, algo, task, model, extra=()):
    # two samples per prompt; spo_tree's group is a tree: two leaves under the root
    group = "spo_tree.branch_factors = (2,)" if algo == "spo_tree" else f"{CONFIGURABLE.get(algo, algo)}.group_size = 2"
    args = ["train", "--algo", algo, "--task", task, "--model", str(model), "--out", str(run_dir), "--budget", "iterations=2"]
    for b in SMALL + [group, *extra]:
        args += ["--set", b]
    main(args)
    return runs.read_run(run_dir), [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["gsm8k", "math"])
@pytest.mark.parametrize("algo", ESTIMATORS.names())
def test_every_strategy_runs_on_gsm8k_and_math_with_real_tokenizers(algo, task, llama, gpt2, tmp_path):
    model = llama if task == "gsm8k" else gpt2  # newline-merging Llama (256 positions); GPT-2 with dropout (512)
    info, trains = _train(tmp_path, algo, task, model)
    assert info["status"] == "finished" and [r["iteration"] for r in trains] == [1, 2]
    if task == "math":  # long MATH prompts do not fit 512 positions with room for 16 tokens: dropped, counted, never fatal
        assert info["dropped_problems"]["train"] > 0 and info["dropped_problems"]["test"] > 0
    else:
        assert info["prompt_tokenization_mismatch"]["alone"] > 0.9
    # dropout off: the first PPO ratio (one epoch, one minibatch: before any update) is 1 up to float rounding (the old
    # log-probs are the sampler's, taken with a KV cache; dropout left on would put approx_kl_old near 1e-2)
    assert abs(trains[0]["ppo/approx_kl_old"]) < 1e-9 and trains[0]["ppo/clip_frac"] == 0.0


def test_a_run_drops_long_prompts_warns_of_the_tokenization_and_records_both(llama, tmp_path, capsys):
    info, trains = _train(tmp_path, "vineppo", "gsm8k", llama, ["train.max_new_tokens = 140"])
    out = capsys.readouterr().out
    assert info["status"] == "finished" and trains[-1]["tokens/mc"] > 0
    assert info["dropped_problems"]["train"] > 0 and "rlzoo: dropped problems" in out
    assert "rlzoo: warning:" in out and "train.prompt_tokenization = 'joint'" in out
    assert info["prompt_tokenization_mismatch"]["sampled"] == 64
    from rlzoo.leaderboard import caveats
    from rlzoo.runs import load_run

    (line,) = [c for c in caveats({"vineppo": [load_run(tmp_path)]}, "ppo") if "dropped" in c]
    assert json.dumps(info["dropped_problems"]["train"]) in line


def test_the_vllm_engine_gives_each_request_its_own_max_tokens(monkeypatch):
    """vLLM gets one SamplingParams per request, whose max_tokens is that prompt's budget (vllm itself needs a GPU:
    a stand-in module records what the engine asks of it)."""
    import sys
    import types
    from dataclasses import dataclass

    from rlzoo.engine.vllm_engine import VLLMEngine, request_seed
    from rlzoo.engine import EngineStats

    @dataclass
    class FakeSamplingParams:
        n: int
        temperature: float
        top_p: float
        stop: list
        skip_special_tokens: bool
        max_tokens: int
        seed: int

    class FakeLLM:
        def generate(self, requests, sampling, use_tqdm):
            self.sampling = sampling
            output = lambda i: types.SimpleNamespace(token_ids=[5] * sampling[i].max_tokens, text="x", finish_reason="length", index=0)  # noqa: E731
            return [types.SimpleNamespace(outputs=[output(i)], prompt_token_ids=r["prompt_token_ids"], num_cached_tokens=0)
                    for i, r in enumerate(requests)]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=FakeSamplingParams))
    engine = object.__new__(VLLMEngine)
    engine.llm, engine.stats = FakeLLM(), EngineStats()
    params = SamplingParams(n=1, max_new_tokens=9, seed=3, first_index=2)
    out = engine.generate([[1, 2], [1, 2, 3]], params, budgets=[4, 7])
    assert [s.max_tokens for s in engine.llm.sampling] == [4, 7] and [len(g[0].token_ids) for g in out] == [4, 7]
    assert [s.seed for s in engine.llm.sampling] == [request_seed(3, 2), request_seed(3, 3)]
    engine.generate([[1, 2]], params)
    assert [s.max_tokens for s in engine.llm.sampling] == [9]  # no budgets: params.max_new_tokens


@pytest.mark.parametrize("mode", ["remaining", "reference"])
def test_vineppo_asks_the_engine_for_each_states_budget(llama, mode):
    from rlzoo.algorithms.vineppo import VinePPO

    policy, tokenizer = load_policy(llama)
    task = get_task("gsm8k")
    problem = max(task.problems("test")[:50], key=lambda p: len(task.split_steps(task.target(p)[:200])))
    prompt = encode_prompts(tokenizer, task, [problem])[0]
    response = tokenizer(task.target(problem), add_special_tokens=False)["input_ids"][:90]
    batch = build_batch(tokenizer, task, [problem], [prompt], [[_completion(response, tokenizer.decode(response))]], [0.0])
    engine, seen = TorchEngine(policy, tokenizer), []
    generate = engine.generate
    engine.generate = lambda prompts, params, budgets=None: seen.append((prompts, budgets)) or generate(prompts, params, budgets)
    ctx = EstimatorContext(policy=policy, tokenizer=tokenizer, engine=engine, task=task, model_path=llama, device=torch.device("cpu"),
                           sampling=SamplingParams(n=1, temperature=1.0, max_new_tokens=96, stop=task.stop, seed=0), seed=0)
    VinePPO(group_size=1, k=2, continuation_budget=mode).advantages(batch, ctx)
    ((states, budgets),) = seen
    assert len(states) == len(batch.step_starts[0]) > 2
    if mode == "remaining":  # what is left of the 96-token response budget
        assert budgets == [96 - (len(s) - len(prompt)) for s in states]
    else:  # the reference's min(max_new_tokens, context - state): the full budget wherever the context has room
        assert budgets == [min(96, 256 - len(s)) for s in states] and set(budgets) == {96}


def test_the_audit_drops_long_prompts_and_gives_alternatives_the_remaining_budget(llama):
    """The credit audit on MATH with a 256-position model: problems whose prompt leaves no room for the response
    budget are dropped (counted in its settings), and every alternative next step is drawn with what is left of its
    response's budget, never past the context."""
    from rlzoo.audit import AuditConfig, audit

    policy, tokenizer = load_policy(llama)
    task, budget = get_task("math"), 48
    problems = task.problems("test")[:40]
    engine = TorchEngine(policy, tokenizer)
    seen = []
    generate = engine.generate
    engine.generate = lambda prompts, params, budgets=None: (seen.append((prompts, params.max_new_tokens, budgets))
                                                             or generate(prompts, params, budgets))
    cfg = AuditConfig(algos=("grpo", "vineppo"), truth_samples=2, alternatives=2, max_new_tokens=budget)
    estimators = {"grpo": build_estimator("grpo", group_size=2), "vineppo": build_estimator("vineppo", group_size=2, k=2)}
    result = audit(policy, tokenizer, engine, task, problems, cfg, estimators=estimators)
    kept, dropped = fit_to_context(tokenizer, task, problems, 256, budget)
    assert dropped and result["settings"]["dropped_problems"] == len(dropped) and result["settings"]["max_new_tokens"] == budget
    assert len(seen[0][0]) == len(kept)  # the responses: one prompt per kept problem
    alternatives = [(prompts, budgets) for prompts, n, budgets in seen[1:] if budgets is not None]
    assert alternatives
    for prompts, budgets in alternatives:
        assert all(len(p) + b <= 256 and b <= budget for p, b in zip(prompts, budgets))
