"""The ``vllm`` engine: an in-process ``vllm.LLM`` (GPU, the ``gpu`` extra) behind the engine interface.

vLLM's paged KV cache, continuous batching and automatic prefix caching (on: a VinePPO state's K
continuations and a prompt's group share their prefix) make it the fast sampler on GPUs. It runs
its engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so ``sync_weights`` can
hand the policy's tensors straight to vLLM's model (``model.load_weights``, the route verl, TRL's
colocate mode and OpenRLHF take): no server, no restart, no checkpoint on disk. The prefix cache
is reset after every sync, since cached keys and values belong to the old weights.

vllm is imported when the engine is built, never when this module is imported, so the module
(and the registry) work on machines without it.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import Sequence

import torch

from rlzoo.engine import ENGINES, Completion, EngineStats, SamplingParams, prompt_budgets
from rlzoo.errors import UserError
from rlzoo.seeds import derive_seed

# Where vLLM keeps the model it runs, newest layout first (v1 in-process engine core, then v0).
_MODEL_PATHS = (
    "llm_engine.model_executor.driver_worker.worker.model_runner.model",
    "llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model",
    "llm_engine.model_executor.driver_worker.model_runner.model",
)


def request_seed(seed: int, prompt_index: int) -> int:
    """vLLM's per-request seed of prompt ``prompt_index``: a request's samples depend on its own seed
    only, not on the other requests in the batch (the prompt's index as the salt)."""
    return derive_seed(seed, 0, prompt_index)


@ENGINES.register("vllm")
class VLLMEngine:
    """Samples with an in-process vLLM copy of ``model`` (the copy is refreshed by ``sync_weights``).

    ``max_batch_size``: vLLM's max_num_seqs (sequences decoded at once).
    ``gpu_memory_utilization``: fraction of GPU memory vLLM may take for weights and KV cache; the
    policy being trained shares the GPU, so this is well below vLLM's default of 0.9.
    ``max_model_len``: longest prompt + completion in tokens (default: the model's context).
    ``dtype``: the dtype vLLM runs in (default: the model's; "bfloat16" where vLLM's attention
    kernels do not take float32).
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 256, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, dtype: str | None = None, enforce_eager: bool = False):
        if not torch.cuda.is_available():
            raise UserError("engine 'vllm' needs a CUDA GPU; use engine 'torch' on this machine")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: weights load in place
        try:
            import vllm
        except ImportError:
            raise UserError("engine 'vllm' needs vllm: pip install 'rlzoo-llm[gpu]' (or use engine 'torch')") from None

        self.tokenizer = tokenizer
        self.stats = EngineStats()
        # vLLM builds its model from a config folder; the weights come from `model` itself (sync_weights
        # below), so the folder holds only config and tokenizer and vLLM starts from dummy weights.
        self._config_dir = tempfile.TemporaryDirectory(prefix="rlzoo-vllm-")
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]  # what vLLM picks its model class by
        config.save_pretrained(self._config_dir.name)
        tokenizer.save_pretrained(self._config_dir.name)
        dtype = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        self.llm = vllm.LLM(
            model=self._config_dir.name,
            load_format="dummy",
            dtype=dtype,
            enable_prefix_caching=True,
            max_num_seqs=max_batch_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=0,
        )
        self.sync_weights(model)

    def _vllm_model(self):
        for path in _MODEL_PATHS:
            obj = self.llm
            try:
                for name in path.split("."):
                    obj = getattr(obj, name)
                return obj
            except AttributeError:
                continue
        raise RuntimeError("cannot find the model inside this vLLM version's LLM object; "
                           f"tried {', '.join(_MODEL_PATHS)} (is VLLM_ENABLE_V1_MULTIPROCESSING=0 honoured?)")

    def sync_weights(self, model) -> None:
        """Copy ``model``'s current weights into vLLM's model in place, then drop the stale prefix cache."""
        with torch.no_grad():
            self._vllm_model().load_weights((name, tensor.detach()) for name, tensor in model.state_dict().items())
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 budgets: Sequence[int] | None = None) -> list[list[Completion]]:
        """Completions [len(prompts)][params.n] of token-id prompts; prompt i gets at most ``budgets[i]`` new
        tokens (its request's own SamplingParams.max_tokens; default: ``params.max_new_tokens``)."""
        import vllm

        from rlzoo.engine.torch_engine import _check

        _check(params)
        budgets = prompt_budgets(params, len(prompts), budgets)
        if any(len(p) == 0 for p in prompts):
            raise UserError("a prompt is empty; every prompt needs at least one token (e.g. BOS)")
        started = time.perf_counter()
        common = dict(n=params.n, temperature=params.temperature, top_p=params.top_p, stop=list(params.stop),
                      skip_special_tokens=True)
        sampling = [vllm.SamplingParams(**common, max_tokens=budget, seed=request_seed(params.seed, params.first_index + i))
                    for i, budget in enumerate(budgets)]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling, use_tqdm=False)
        completions = [
            [Completion(token_ids=list(o.token_ids), text=o.text, finish_reason="length" if o.finish_reason == "length" else "stop")
             for o in sorted(out.outputs, key=lambda o: o.index)]
            for out in outputs
        ]
        generated = sum(len(c.token_ids) for group in completions for c in group)
        self.stats.tokens_generated += generated
        self.stats.forward_tokens += generated + sum(len(out.prompt_token_ids) - (getattr(out, "num_cached_tokens", 0) or 0) for out in outputs)
        self.stats.seconds += time.perf_counter() - started
        return completions
