"""Data parallelism: the few things the loop needs to run under ``torchrun`` or the ``deepspeed`` launcher.

Every helper is the identity in one process, so single-process code paths are the same code.

- ``join()``: join the launcher's process group (from the ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
  ``MASTER_PORT`` environment both launchers set); ``init(device)``: that, and this rank's device.
- ``rank()``, ``world_size()``, ``is_main()``; ``shard(n)``: this rank's contiguous part of ``range(n)``.
- collectives: ``all_reduce``, ``gather_objects``, ``gather_rows``, ``barrier``, ``check`` (all ranks
  raise the same one-line UserError when any rank fails a check, instead of hanging).
- ``Trained``: a module being trained by AdamW, one process, DDP or DeepSpeed ZeRO alike.
- ``shutdown(code)``: destroy the process group, flush, ``os._exit``. gloo's teardown at interpreter
  exit aborts ~10-20% of two-process runs (``terminate called without an active exception``); this
  does not.

Gradients: DDP and DeepSpeed *average* gradients over ranks, while rlzoo's losses are already
normalised by the global minibatch (each rank's loss is its share of the global mean), so
``Trained.backward`` multiplies by the world size: the reduced gradient is then the single-process one.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from rlzoo.errors import UserError

# ----------------------------------------------------------------------------- process group


def launched() -> bool:
    """Whether a launcher (torchrun, deepspeed, anything that sets RANK and WORLD_SIZE) started this process as a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1)) if launched() else 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0)) if launched() else 0


def is_main() -> bool:
    return rank() == 0


def join() -> None:
    """Join the launcher's process group, if launched and not joined yet. The CLI does it first thing,
    so that even an error in the command line reaches ``shutdown`` in a group (see there)."""
    if launched() and not dist.is_initialized():
        # gloo carries the CPU tensors (checks, pickled objects); nccl the GPU ones.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def init(device: str = "auto") -> torch.device:
    """Join the launcher's process group (``join``) and return this rank's device: ``cuda:LOCAL_RANK``
    for "auto" or "cuda" on a GPU machine, else what ``device`` names. A device that this rank does
    not have is a UserError on every rank."""
    join()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    problem = ""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved, problem = torch.device("cpu"), f"unknown device {device!r}; use cpu, cuda or cuda:N"
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            problem = f"device {device!r} asked for, but torch sees no CUDA device; use cpu"
        else:
            index = resolved.index if resolved.index is not None else local_rank
            if index >= torch.cuda.device_count():
                problem = (f"rank {rank()} needs cuda:{index} but this machine has {torch.cuda.device_count()} GPU(s); "
                           "launch at most that many processes per node")
            else:
                resolved = torch.device("cuda", index)
                torch.cuda.set_device(resolved)
    check(not problem, problem)
    return resolved


def check(ok: bool, message: str) -> None:
    """Raise ``UserError(message)`` on every rank if any rank's ``ok`` is False (its message wins).
    A collective: every rank must call it at the same point."""
    if world_size() == 1 or not dist.is_initialized():
        if not ok:
            raise UserError(message)
        return
    failures = [m for m in gather_objects(None if ok else message) if m is not None]
    if failures:
        raise UserError(failures[0])


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def shutdown(code: int) -> None:
    """End a launched rank: leave the process group, flush, and exit now (no interpreter teardown).

    On failure, first wait (a few seconds at most) for the other ranks to get here: a launcher kills
    every rank once one exits, and a check that fails on every rank must print its line on every rank."""
    try:
        if dist.is_initialized():
            if code and world_size() > 1:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=5), wait_all_ranks=True)
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ----------------------------------------------------------------------------- collectives


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: torch.Tensor | list[float] | float, op: str = "sum"):
    """Sum (or "max", "min") over ranks. Takes and returns a tensor, a list of floats or a float."""
    if world_size() == 1:
        return values
    kind = "tensor" if isinstance(values, torch.Tensor) else "list" if isinstance(values, (list, tuple)) else "float"
    t = values if kind == "tensor" else torch.tensor(values if kind == "list" else [values], dtype=torch.float64)
    buffer = t.detach().to(_collective_device(), copy=True)
    dist.all_reduce(buffer, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    buffer = buffer.to(t.device)
    return buffer if kind == "tensor" else buffer.tolist() if kind == "list" else buffer.item()


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(n: int) -> range:
    """This rank's contiguous part of ``range(n)`` (parts differ in size by at most one)."""
    w, r = world_size(), rank()
    return range(n * r // w, n * (r + 1) // w)


def split_rows(rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of ``rows`` (a global minibatch's row indices)."""
    part = shard(len(rows))
    return rows[part.start : part.stop]


def gather_rows(fn: Callable[[range], torch.Tensor], n: int) -> torch.Tensor:
    """``fn(shard(n))`` on every rank, concatenated in rank order: the [n, ...] result of ``fn(range(n))``
    with the work split over ranks. The parts are gathered on the CPU."""
    mine = fn(shard(n)).cpu()
    return mine if world_size() == 1 else torch.cat(gather_objects(mine))


# ----------------------------------------------------------------------------- DeepSpeed configs


def load_deepspeed_config(path: str) -> dict:
    """Read a DeepSpeed JSON config and check what rlzoo relies on; a bad one is a one-line UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"DeepSpeed config {path!r} not found (examples: benchmarks/deepspeed/*.json)")
    try:
        config = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise UserError(f"DeepSpeed config {path!r}: zero_optimization.stage = {stage!r}; rlzoo supports ZeRO stage 1, 2 or 3 "
                        "(for plain data parallelism, launch without a DeepSpeed config: rlzoo then uses DDP)")
    for key in ("offload_optimizer", "offload_param"):
        target = zero.get(key, {}).get("device", "none")
        if target not in ("none", "cpu", "nvme"):
            raise UserError(f"DeepSpeed config {path!r}: zero_optimization.{key}.device = {target!r}; expected none, cpu or nvme")
        if target == "nvme" and not Path(str(zero[key].get("nvme_path", ""))).is_dir():
            raise UserError(f"DeepSpeed config {path!r}: zero_optimization.{key} offloads to nvme_path "
                            f"{zero[key].get('nvme_path')!r}, which is not a folder on this machine")
    if key := next((k for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
                    if config.get(k, "auto") != "auto"), None):
        raise UserError(f"DeepSpeed config {path!r} sets {key}; remove it (or write \"auto\"): rlzoo sets batch sizes from "
                        "train.prompts_per_iteration and ppo.minibatches / ppo.micro_batch_size")
    return config


def check_deepspeed_device(config: dict, device: torch.device, name: str = "the DeepSpeed config") -> None:
    """A config whose precision needs a device this run does not have is a UserError."""
    if config.get("fp16", {}).get("enabled") and device.type != "cuda":
        raise UserError(f"{name} enables fp16, which needs a CUDA device, but this run is on {device.type}; "
                        "use bf16 or fp32 there (delete the fp16 block)")


# ----------------------------------------------------------------------------- trained modules


class Trained:
    """A module trained by AdamW (+ a learning-rate schedule and gradient clipping), in one process,
    under DDP, or through ``deepspeed.initialize`` with ZeRO 1-3. The loss code is the same for all::

        for i, micro in enumerate(micro_batches):          # this rank's rows of a global minibatch
            with trained.accumulating(last=i == len(micro_batches) - 1):
                loss = loss_of(trained(...))               # normalised by the *global* minibatch
                trained.backward(loss, drop=skip_this_minibatch)
        grad_norm = trained.step(drop=skip_this_minibatch)

    ``module`` stays the plain module (sampling, no-grad forwards, saving); calling ``trained(...)``
    runs the training forward through DDP / DeepSpeed.
    """

    def __init__(self, module: torch.nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0, micro_batch_size: int = 1, lr_lambda: Callable[[int], float] | None = None,
                 deepspeed_config: dict | None = None):
        self.module = module
        self.max_grad_norm = max_grad_norm
        lr_lambda = self.lr_lambda = lr_lambda or (lambda step: 1.0)  # kept: a critic may follow the policy's schedule
        self.engine = None
        if deepspeed_config is not None:
            import deepspeed

            if not dist.is_initialized():  # one process without a launcher: DeepSpeed still wants a process group
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it (RANK / WORLD_SIZE stay unset: not "launched")
            config = copy.deepcopy(deepspeed_config)
            config |= {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
                       "train_batch_size": micro_batch_size * world_size(), "gradient_clipping": max_grad_norm}
            extra = config.get("optimizer", {}).get("params", {})
            on_cpu = next(module.parameters()).device.type == "cpu"
            config["optimizer"] = {"type": "AdamW", "params": {"torch_adam": on_cpu, **extra, "lr": lr, "betas": list(betas),
                                                               "weight_decay": weight_decay, "eps": 1e-8}}
            config.setdefault("steps_per_print", 10**9)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=config,
                lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda))
            self.forward = self.engine
            self.zero_stage = self.engine.zero_optimization_stage()
        else:
            self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
            self.forward = torch.nn.parallel.DistributedDataParallel(module) if world_size() > 1 else module
            self.zero_stage = 0

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    @property
    def direct(self) -> bool:
        """Whether a training forward runs the plain module (one process, no DeepSpeed): several forwards may then
        feed one backward (length buckets, shared prompts). DDP and DeepSpeed pair each backward with one forward."""
        return self.forward is self.module

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @contextlib.contextmanager
    def accumulating(self, last: bool):
        """Around one micro-batch's forward and backward: gradients are reduced across ranks only on
        the ``last`` micro-batch of a minibatch (DDP's no_sync, DeepSpeed's accumulation boundary)."""
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last)
            yield
        elif last or self.forward is self.module:
            yield
        else:
            with self.forward.no_sync():
                yield

    def backward(self, loss: torch.Tensor, drop: bool = False) -> None:
        """Accumulate the gradient of ``loss`` (normalised by the global minibatch; see the module doc).
        ``drop`` on the last micro-batch of a minibatch that ``step(drop=True)`` will discard."""
        loss = loss * world_size()
        if self.engine is None:
            loss.backward()
        elif not drop:
            self.engine.backward(loss)
        else:
            # Gradients already reduced into ZeRO's partitions have no public "discard"; DeepSpeed's own
            # skip path for non-finite gradients (its fp16 overflow check, run for fp32/bf16 too at every
            # ZeRO stage rlzoo allows) drops them with the step, and step() checks that it did.
            self.engine.backward(loss * float("nan"))

    def step(self, drop: bool = False) -> float:
        """Clip, take the optimizer and schedule step, clear the gradients; return the gradient norm
        before clipping. ``drop``: discard the accumulated gradients instead (no step; returns nan)."""
        if self.engine is not None:
            self.engine.step()
            if drop:
                if self.engine.was_step_applied():
                    raise RuntimeError("DeepSpeed applied a step with non-finite gradients; set zero_optimization."
                                       "compute_grad_norm (and bf16.check_grad_overflow) to true")
                return float("nan")
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        if drop:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @contextlib.contextmanager
    def full_weights(self):
        """Within: ``module``'s parameters hold the full weights on every rank and its forward runs no
        collectives (ZeRO-3 gathers its partitions and lifts its hooks, read-only; a no-op otherwise),
        so each rank can sample as many tokens as its own prompts need."""
        if self.zero_stage != 3:
            yield
            return
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(self.engine):
            yield

    # ------------------------------------------------------------------------- checkpoints

    def state_dict_for_saving(self) -> dict[str, torch.Tensor] | None:
        """The full weights on rank 0 (None elsewhere). A collective under ZeRO-3."""
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict()
        return state if is_main() else None

    def save(self, folder: Path, name: str) -> None:
        """Write weights and optimizer state under ``folder`` (all ranks call it; rank 0 writes the
        weights: ``name/`` via save_pretrained for transformers models, else ``name.safetensors``).
        Optimizer + schedule: ``name.optim.pt`` (one process / DDP, rank 0) or ``name.zero/`` (DeepSpeed,
        every rank writes its partition: resume needs the same number of processes)."""
        state = self.state_dict_for_saving()
        if is_main():
            if hasattr(self.module, "save_pretrained"):
                self.module.save_pretrained(folder / name, state_dict=state, safe_serialization=True)
            else:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / f"{name}.safetensors"))
            if self.engine is None:
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                           folder / f"{name}.optim.pt")
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder / f"{name}.zero"), tag="state", save_latest=False)

    def load(self, folder: Path, name: str) -> None:
        """Restore what ``save`` wrote (every rank reads it)."""
        if self.engine is not None:
            if not (folder / f"{name}.zero").is_dir():
                raise UserError(f"{folder} was not saved by DeepSpeed; resume it with the launch that wrote it")
            path, _ = self.engine.load_checkpoint(str(folder / f"{name}.zero"), tag="state")
            if path is None:
                raise UserError(f"cannot resume {folder}/{name}.zero with {world_size()} process(es); "
                                "resume with the number of processes that wrote it")
            return
        if not (folder / f"{name}.optim.pt").exists():
            raise UserError(f"{folder} was saved by DeepSpeed; resume it with the same --deepspeed config")
        try:
            if hasattr(self.module, "save_pretrained"):
                weights = type(self.module).from_pretrained(folder / name).state_dict()
            else:
                from safetensors.torch import load_file

                weights = load_file(str(folder / f"{name}.safetensors"))
        except Exception as e:  # safetensors, transformers and the OS each raise their own on a cut or foreign file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot load the {name} weights of {folder} ({reason}); delete that checkpoint folder to "
                            "resume from an earlier one") from None
        self.module.load_state_dict(weights)
        from rlzoo.runs import load_torch_file

        saved = load_torch_file(folder / f"{name}.optim.pt")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])

