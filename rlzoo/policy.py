"""Policies: load any causal LM + tokenizer; build and pretrain the built-in default.

Every policy is a transformers ``AutoModelForCausalLM`` with its ``AutoTokenizer``, saved as
safetensors with ``save_pretrained``. ``load_policy("default")`` is the built-in default: a small
Llama over a character vocabulary, trained by supervised fine-tuning (SFT) on the worked solutions
of the arithmetic task, cached under ``$RLZOO_HOME/policies/default-<hash of its config>/`` so that
it is built once per config.

Tokenizer conventions rlzoo relies on:
- ``tokenizer(prompt)`` gives the prompt ids the engine continues (BOS first for the built-in policy,
  whatever the model's own template adds for a hub model);
- a pad token always exists (the EOS token when the model has none);
- ``padding_side = "left"``: batched prompts end where generation starts. Code that builds training
  tensors (rollout batches, SFT) pads by hand on the right and never relies on this setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gin
import torch

from rlzoo.errors import UserError, check_ranges

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # pad, bos, eos, unk: ids 0..3 of a char tokenizer
PRETRAIN_FORMAT = 1  # bump when pretraining changes in a way that makes old cached policies stale


# --------------------------------------------------------------------------------------------- tokenizer


def build_char_tokenizer(alphabet: str):
    """A character-level PreTrainedTokenizerFast: one token per character of ``alphabet``.

    A BPE model with no merges splits text into single characters; the Fuse decoder joins them back,
    so ``decode(encode(text), skip_special_tokens=True) == text`` for any text over the alphabet,
    newlines and spaces included. Encoding prepends BOS; characters outside the alphabet become <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))  # unique, in order: token ids are stable for a given alphabet
    if any(c in SPECIAL_TOKENS for c in chars) or not chars:
        raise ValueError(f"alphabet must be non-empty characters, got {alphabet!r}")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    pad, bos, eos, unk = SPECIAL_TOKENS
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------------------------ loading


def _is_local_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that looks like a path is meant as one."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_model(name_or_path: str) -> None:
    """Refuse a local model path that cannot be a model folder, as cheaply as a stat: commands check it before
    they write anything (a hub id is only checked as it loads)."""
    if name_or_path == "default" or not _is_local_path(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise UserError(f"model path {name_or_path!r} does not exist (give a folder written by save_pretrained, a hub id, or 'default')")
    if not (path / "config.json").is_file():
        raise UserError(f"model folder {name_or_path!r} has no config.json (give a folder written by save_pretrained)")


DEFAULT_POLICY_TASKS = ("arith",)  # the built-in default policy is pretrained on these tasks only


def check_model_for_task(model: str, task: str) -> None:
    """Refuse the built-in default policy for a task it never learned, before anything is built or written: it would
    be built (minutes), then score 0 on answers it cannot write. Shared by train, eval and bench."""
    if model == "default" and task not in DEFAULT_POLICY_TASKS:
        raise UserError(f"the built-in default policy only knows {', '.join(DEFAULT_POLICY_TASKS)}; "
                        f"for --task {task} pass --model PATH (a causal LM folder)")


def load_policy(name_or_path: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
    """(model, tokenizer) for a hub id, a local folder written by ``save_pretrained``, or ``"default"``.

    ``dtype``: a torch dtype or its name ("bfloat16"); None keeps the saved one. The model is in eval
    mode on ``device``. Anything that cannot be loaded raises a one-line UserError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading bars: noise next to rlzoo's own output
    check_model(name_or_path)
    if name_or_path == "default":
        source = str(default_policy_path())
    else:
        source = str(Path(name_or_path).expanduser()) if _is_local_path(name_or_path) else name_or_path
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise UserError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto")
    except (OSError, ValueError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "model folder" if Path(source).is_dir() else "model (not a local folder, and not loadable from the Hugging Face hub)"
        raise UserError(f"cannot load {where} {name_or_path!r}: {reason}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is None:  # rollout batches pad with one of them
        raise UserError(f"the tokenizer of {name_or_path!r} has neither a pad nor an EOS token; give it one "
                        "(tokenizer.add_special_tokens({'pad_token': ...}) or eos_token) and save_pretrained it again")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return disable_dropout(model).to(device).eval(), tokenizer


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of ``model``'s state (each tensor's name, dtype, shape and bytes): equal digests mean the very same
    weights, whatever folder or hub id they were loaded from. The default policy built on another kind of CPU has
    another digest (its SFT rounds differently), so a leaderboard can tell runs from different starts apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every dropout off, in train mode too, as the VinePPO reference's ``disable_dropout``.

    PPO's ratio divides a train-mode forward by log-probs taken in eval mode (the old and reference log-probs,
    the sampler's): with dropout on, it is 0.9-1.1 before any update, and the clip spends itself on noise.
    Zeroed three ways, since architectures drop out differently: ``nn.Dropout`` modules (GPT-2), float
    ``*dropout*`` attributes that modules copied from their config and pass to attention kernels (Llama's
    ``attention_dropout``), and the config's own fields, so that a checkpoint saved from it reloads without.
    Used on the policy (and so the reference, its copy) and the critic. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name, value in list(vars(config).items()) if config is not None else []:
        if ("dropout" in name or name.endswith("_pdrop")) and isinstance(value, float):
            setattr(config, name, 0.0)
    return model


# ------------------------------------------------------------------------------------ the built-in default


@gin.configurable("pretrain")
@dataclass
class PretrainConfig:
    """How the built-in default policy is built. Every field enters the cache key."""

    task: str = "arith"  # task whose worked solutions (prompt -> target) the SFT imitates
    # Knobs passed to the task's constructor. arith's train pool widened to 100k so that SFT sees each problem about
    # once (arith's test split stays disjoint; the RL train pool is the first 4,000, seen once at most).
    task_kwargs: dict = field(default_factory=lambda: {"train_size": 100_000})
    hidden_size: int = 128  # Llama width
    num_layers: int = 4  # Llama decoder layers
    num_heads: int = 4  # attention heads (no grouped-query attention)
    intermediate_size: int = 384  # MLP width
    steps: int = 800  # optimizer steps (~0.2 s each on 2 CPU cores at the default size)
    batch_size: int = 64  # sequences (prompt + solution) per step
    lr: float = 2e-3  # AdamW peak learning rate
    warmup_steps: int = 80  # linear warm-up from 0 to lr, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global grad norm
    seed: int = 0  # initial weights and data order

    def __post_init__(self):
        check_ranges(self, {"hidden_size": ">= 1", "num_layers": ">= 1", "num_heads": ">= 1", "intermediate_size": ">= 1",
                            "steps": ">= 1", "batch_size": ">= 1", "lr": ">= 0", "warmup_steps": ">= 0",
                            "weight_decay": ">= 0", "grad_clip": "> 0"}, "pretrain")
        if self.hidden_size % self.num_heads:
            raise UserError(f"pretrain.hidden_size = {self.hidden_size} does not split over pretrain.num_heads = "
                            f"{self.num_heads} attention heads; use a multiple of {self.num_heads}")


# Presets: field values under the gin bindings (a binding of pretrain.X beats the preset's X).
PRESETS: dict[str, dict] = {
    # Measured: 0.86M parameters, 800 steps at ~0.2 s (2 idle cores; ~0.5 s on one thread of a busy machine),
    # arith test accuracy 52% greedy, 49% at T = 0.35, 46% at T = 0.6 (train pool alike; ood_test ~2%).
    "default": {},
    # Builds in well under a minute, on an easier arith (1-2 operations, operands 1-9), so that its sampled accuracy
    # is clearly above 0 and far from 1: RL tests can show reward rising. Measured: 0.11M parameters, 600 steps in
    # 19 s (one thread, busy 2-core machine); test accuracy 49% greedy, 48% at T = 0.35, 46% at T = 0.6.
    # Evaluate or train it on the arith it learned: bind ``preset_task_bindings("tiny")`` (tests/conftest.py does).
    "tiny": dict(
        task_kwargs={"max_ops": 2, "ood_max_ops": 3, "max_operand": 9},
        hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192,
        steps=600, batch_size=32, lr=3e-3, warmup_steps=60,
    ),
}


def preset_task_bindings(preset: str) -> list[str]:
    """Gin bindings that give the task the knobs the preset's policy was pretrained on (``arith.max_ops = 2``, ...),
    except the SFT pool's ``train_size``: a run or evaluation of that policy passes them as ``--set``."""
    cfg = PretrainConfig(**{**dataclasses.asdict(PretrainConfig()), **PRESETS[preset]})
    return [f"{cfg.task}.{k} = {v!r}" for k, v in cfg.task_kwargs.items() if k != "train_size"]


def pretrain_config(preset: str = "default", **overrides) -> PretrainConfig:
    """The preset's config, with the process's gin bindings of ``pretrain.*`` over it and ``overrides`` over both."""
    if preset not in PRESETS:
        raise UserError(f"unknown pretrain preset {preset!r}; known: {', '.join(PRESETS)}")
    return PretrainConfig(**{**PRESETS[preset], **gin.get_bindings("pretrain"), **overrides})


def rlzoo_home() -> Path:
    """Where rlzoo caches what it builds: $RLZOO_HOME, else $XDG_CACHE_HOME/rlzoo, else ~/.cache/rlzoo."""
    if os.environ.get("RLZOO_HOME"):
        return Path(os.environ["RLZOO_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlzoo"


KEY_PAIRS = 256  # the policy's cache key hashes the first train pairs (and their count), not the whole pool


def _sft_task(cfg: PretrainConfig, **overrides):
    """The SFT task: its constructor's defaults with ``cfg.task_kwargs`` over them (and ``overrides`` over both),
    passed explicitly so that the run's gin bindings of the task (``--set arith.test_size=20``) neither reach the
    pretrain nor trigger a rebuild; the pretrain's task is set by ``pretrain.task_kwargs`` alone."""
    import inspect

    from rlzoo.tasks import TASKS

    task_cls = TASKS.get(cfg.task)
    if not hasattr(task_cls, "alphabet"):  # checked first: the default knobs are arith's, and would be named instead
        raise UserError(f"task {cfg.task!r} has no character alphabet; the built-in policy pretrains on tasks that do (arith)")
    defaults = {k: p.default for k, p in inspect.signature(task_cls).parameters.items() if p.default is not p.empty}
    unknown = set(cfg.task_kwargs) - set(defaults)
    if unknown:
        raise UserError(f"pretrain.task_kwargs: task {cfg.task!r} has no knob {', '.join(sorted(unknown))}; it has {', '.join(defaults)}")
    return task_cls(**{**defaults, **cfg.task_kwargs, **overrides}), {**defaults, **cfg.task_kwargs}


def _folder(cfg: PretrainConfig, home: Path | None, head: list[tuple[str, str]], n: int) -> Path:
    # The key hashes the data as well as the config, so a change to how the task writes problems is a new policy.
    blob = json.dumps({"format": PRETRAIN_FORMAT, "config": dataclasses.asdict(cfg), "data": head[:KEY_PAIRS], "n": n}, sort_keys=True)
    return Path(home or rlzoo_home()) / "policies" / f"default-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _sft_data(cfg: PretrainConfig, home: Path | None) -> tuple[object, list[tuple[str, str]], Path]:
    """The SFT task, its (prompt, target) train pairs, and the cache folder of the policy ``cfg`` builds."""
    task, _ = _sft_task(cfg)
    pairs = [(task.prompt(p), task.target(p)) for p in task.problems("train")]
    return task, pairs, _folder(cfg, home, pairs, len(pairs))


def policy_folder(cfg: PretrainConfig, home: Path | None = None) -> Path:
    """The cache folder of the policy ``cfg`` builds (it may not exist yet).

    Drawn from a train pool of ``KEY_PAIRS`` problems, not the whole pool (100k for the default: 0.84 s at every
    run's start): a task's larger train pool starts with the problems of a smaller one (arith draws its train
    split from one stream), so the key is ``_sft_data``'s; ``pretrain`` checks that it is."""
    knobs = _sft_task(cfg)[1]
    size = knobs.get("train_size")
    if not isinstance(size, int) or size <= KEY_PAIRS:
        return _sft_data(cfg, home)[2]
    task, _ = _sft_task(cfg, train_size=KEY_PAIRS)
    return _folder(cfg, home, [(task.prompt(p), task.target(p)) for p in task.problems("train")], size)


def default_policy_path(cfg: PretrainConfig | None = None, home: Path | None = None) -> Path:
    """The cached default policy folder for ``cfg`` (default: ``pretrain_config()``), built if missing."""
    cfg = cfg or pretrain_config()
    folder = policy_folder(cfg, home)
    return folder if (folder / "pretrain.json").is_file() else pretrain(cfg, home)


def build_model(cfg: PretrainConfig, tokenizer):
    """A freshly initialised Llama sized by ``cfg`` over ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def _sft_batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 on prompt and padding, so the loss
    counts only the target's tokens and the EOS that ends it."""
    prompts = tokenizer([prompt for prompt, _ in pairs])["input_ids"]  # BOS + prompt, as the engine will see it
    targets = tokenizer([target for _, target in pairs], add_special_tokens=False)["input_ids"]
    rows = [p + t + [tokenizer.eos_token_id] for p, t in zip(prompts, targets)]
    label_rows = [[-100] * len(p) + t + [tokenizer.eos_token_id] for p, t in zip(prompts, targets)]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # [B, L] long
    labels = torch.full((len(rows), width), -100)  # [B, L] long
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, L] long
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(label_row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, labels


def pretrain(cfg: PretrainConfig, home: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Build the default policy for ``cfg`` by SFT and return its cache folder.

    Skipped when the folder already exists (unless ``force``). The policy is built in a temporary
    folder beside the cache and renamed into place when complete, so a killed build leaves nothing
    that looks finished.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import get_cosine_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    task, pairs, folder = _sft_data(cfg, home)
    if not pairs:
        raise UserError(f"task {cfg.task!r} has no train problems to pretrain on")
    if policy_folder(cfg, home) != folder:
        raise RuntimeError(f"task {cfg.task!r}: a train pool of {KEY_PAIRS} problems does not start the larger one; "
                           "policy_folder would name another policy than the one built here")
    if (folder / "pretrain.json").is_file() and not force:
        return folder

    tokenizer = build_char_tokenizer(task.alphabet)
    model = build_model(cfg, tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    rng = random.Random(cfg.seed)
    order: list[int] = []  # a fresh shuffle of the train pairs each epoch
    started, losses = time.time(), []
    columns = [TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        bar_task = bar.add_task("sft", total=cfg.steps, loss=math.nan)
        for step in range(cfg.steps):
            if len(order) < cfg.batch_size:
                order += rng.sample(range(len(pairs)), len(pairs))
            batch, order = [pairs[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
            input_ids, attention_mask, labels = _sft_batch(tokenizer, batch)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(bar_task, advance=1, loss=sum(losses[-20:]) / len(losses[-20:]))
            if progress and not bar.console.is_terminal and (step + 1) % max(cfg.steps // 10, 1) == 0:
                bar.console.print(f"pretrain step {step + 1}/{cfg.steps} loss {losses[-1]:.3f} {time.time() - started:.0f}s")  # logs get lines, not a bar

    hf_logging.disable_progress_bar()
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    model.eval().save_pretrained(building)
    tokenizer.save_pretrained(building)
    info = {
        "format": PRETRAIN_FORMAT,
        "config": dataclasses.asdict(cfg),
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - started, 1),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_pairs": len(pairs),
    }
    (building / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")  # written last: marks it complete
    if folder.exists() and not force:  # a concurrent build finished first: keep it (another process may be reading it)
        shutil.rmtree(building, ignore_errors=True)
        return folder
    if folder.exists():  # --force: move the old build aside, then drop it
        stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}-stale-", dir=folder.parent))
        os.replace(folder, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(building, folder)
    return folder


def describe_policy(folder: Path) -> dict:
    """What pretrain.json records about a built default policy (params, seconds, config, ...)."""
    return json.loads((Path(folder) / "pretrain.json").read_text())
