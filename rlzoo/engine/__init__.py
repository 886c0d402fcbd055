"""The engine interface: every sampler in rlzoo (rollouts, MC values, evaluation) goes through it.

    engine.generate(prompts, params) -> completions[num_prompts][params.n]

Prompts are token ids (the caller tokenizes); completions come back as token ids and text with the
reason they finished (a prompt may get a budget of its own: ``budgets``). Backends: ``torch`` (transformers model, CPU or GPU) and ``vllm`` (GPU, the
``gpu`` extra). The torch engine samples from the very module being trained, so ``sync_weights`` is
free; vLLM copies the new weights in place after each update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

from rlzoo.errors import UserError
from rlzoo.registry import Registry

ENGINES: Registry = Registry(
    "engine", "rlzoo.engines", builtin_modules=("rlzoo.engine.torch_engine", "rlzoo.engine.vllm_engine")
)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # generation ends after the token that completes one of these strings
    seed: int = 0  # same seed, same prompts, same weights -> same tokens (on CPU)
    # Position of prompts[0] in a larger request that was split (data-parallel ranks each send their
    # part): prompt i draws the randomness prompt first_index + i would draw in one call with the
    # same seed, so how a request is split does not change its samples.
    first_index: int = 0
    # Also return each generated token's log-prob under the sampling model at ``temperature`` (the full softmax,
    # before top-p: the distribution PPO's ratio compares), where the engine computes it with the very module
    # being trained (the torch engine). Engines that cannot (vLLM: other kernels and precision) return none.
    logprobs: bool = False


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens, EOS / stop-completing token included
    text: str  # decoded text, special tokens and the stop string removed
    finish_reason: Literal["stop", "length"]  # "stop": EOS or a stop string; "length": max_new_tokens
    logprobs: list[float] | None = None  # per generated token, if asked (SamplingParams.logprobs) and the engine computes them


@dataclass
class EngineStats:
    """Counters the training loop reads to log throughput by purpose."""

    tokens_generated: int = 0
    forward_tokens: int = 0  # prefill + decode tokens actually run through the model
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def prompt_budgets(params: SamplingParams, num_prompts: int, budgets: Sequence[int] | None) -> list[int]:
    """Each prompt's budget of new tokens: ``budgets[i]`` where given (a VinePPO state gets what is left of its
    response's budget), else ``params.max_new_tokens``; every budget at least 1 (a UserError otherwise)."""
    if budgets is None:
        return [params.max_new_tokens] * num_prompts
    budgets = [int(b) for b in budgets]
    if len(budgets) != num_prompts:
        raise UserError(f"{len(budgets)} budgets for {num_prompts} prompts; give one per prompt")
    if budgets and min(budgets) < 1:
        raise UserError(f"every prompt's budget of new tokens must be at least 1, got {min(budgets)}")
    return budgets


def context_length(model) -> int | None:
    """Positions ``model`` can attend over (prompt + response), from its config; None if it states none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class Engine(Protocol):
    stats: EngineStats

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 budgets: Sequence[int] | None = None) -> list[list[Completion]]:
        """Completions [len(prompts)][params.n]; prompt i gets at most budgets[i] new tokens (default: params.max_new_tokens)."""
        ...

    def sync_weights(self, model) -> None:
        """Make the engine sample from ``model``'s current weights."""
        ...
