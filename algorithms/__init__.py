"""Credit-assignment strategies ("estimators"): each turns a rollout batch into per-token advantages.

The contract, one signature for all::

    batch = estimator.sample(problems, ctx)        # RolloutBatch: the iteration's rollouts (default: group_size per prompt)
    credit = estimator.advantages(batch, ctx)      # Credit: advantages [B, L] (+ returns, values, loss_mask, stats)
    stats = estimator.update_critic(batch, credit, ctx)   # only does work if it owns a critic

and three declared needs that the training loop reads without knowing the strategy's name:
``group_size`` (samples per prompt), ``critic`` (a module it owns and trains, or None) and whether
it draws extra rollouts (it then uses ``ctx.values_by_rollouts``). A critic is made trainable with
``ctx.prepare(name, module, lr=...)``, which returns a ``distributed.Trained`` (one process, DDP or
DeepSpeed, as the run is launched) that the loop checkpoints. Under data parallelism every rank
holds the whole (global) batch: estimators compute on it as in one process, and only their heavy
parts are split (``values_by_rollouts``; a critic's forward and update, see ``value_ppo``). Register with
``@ESTIMATORS.register("name")`` (built-ins) or the ``rlzoo.estimators`` entry-point group
(third-party packages: ``name = "package.module:EstimatorClass"``). Every module of this package is a
built-in: they are found by listing the package (``pkgutil``), not named anywhere.

What the credit audit (``rlzoo audit``) reads, also through the contract and never by name:

- ``Credit.values``: every estimator's V̂ of the state before each response token (GRPO / RLOO their
  baseline, REINFORCE 0, VinePPO its Monte-Carlo values, PPO its critic).
- ``state_values(states, problems, prompt_lens, ctx, rewards)``: V̂ of arbitrary token prefixes (to rank
  alternative next steps); None, the default, for a strategy that values a state only through the
  response it lies on (a group baseline).
- ``learned`` / ``load_learned(checkpoint, ctx)``: a strategy whose credit needs what it learned in
  training (a critic) says so, and loads it from a checkpoint of one of its runs; the audit trains
  such a run (``rlzoo train`` with the policy frozen) when it is given none.
- ``report_options``: the settings shown beside its name in reports (VinePPO: ``k``).
"""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlzoo.errors import check_ranges
from rlzoo.registry import Registry

if TYPE_CHECKING:
    from rlzoo.rollout import RolloutBatch
    from rlzoo.tasks import Problem

# Built-ins: every module of this package (a new strategy is one new file here, or a package's entry point).
ESTIMATORS: Registry = Registry(
    "estimator",
    "rlzoo.estimators",
    builtin_modules=tuple(f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")),
)


@dataclass
class Credit:
    advantages: torch.Tensor  # [B, L] float32, 0 outside the response mask
    returns: torch.Tensor | None = None  # [B, L] float32: critic targets, for strategies with a critic
    values: torch.Tensor | None = None  # [B, L] float32: V̂(state before token i), 0 outside the response mask; every built-in fills it
    # [B, L] float32: the tokens the policy loss (and the advantage whitening) covers, if not every response token
    # (SPO-chain's probability mask); 0 outside the response mask
    loss_mask: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)  # logged as "credit/<key>"


class Estimator:
    """Defaults for the optional parts of the contract; a strategy overrides what it has."""

    group_size: int = 1
    critic: torch.nn.Module | None = None
    uses_rollouts: bool = False  # draws extra rollouts through ctx (VinePPO, ReMax)
    loss_agg: str | None = None  # a loss aggregation that is part of the method (Dr. GRPO); None: ppo.loss_agg
    # Field -> rule (rlzoo.errors.check_ranges), checked as a dataclass estimator is built: a bad binding is one
    # line that names it, before a run folder exists. A strategy with more numbers extends it.
    ranges: dict[str, str] = {"group_size": ">= 1"}
    learned: bool = False  # its credit needs what it learned in training (a critic): an audit calls load_learned
    report_options: tuple[str, ...] = ()  # fields shown beside its name in reports, e.g. ("k",) -> "vineppo (k=9)"

    def __post_init__(self) -> None:
        check_ranges(self, self.ranges)

    def setup(self, ctx: Any) -> None:
        """Called once before training (e.g. to build a critic from the policy checkpoint)."""

    def sample(self, problems: list, ctx: Any) -> "RolloutBatch":
        """The iteration's rollouts and rewards for ``problems``: by default ``group_size`` independent responses to
        each (``rollout.sample_groups``). A strategy that owns the shape of its samples (SPO-tree's tree of segments)
        overrides it; the loop always calls it and never learns which shape it got."""
        from rlzoo.rollout import sample_groups

        return sample_groups(problems, ctx)

    def advantages(self, batch: "RolloutBatch", ctx: Any) -> Credit:
        raise NotImplementedError

    def update_critic(self, batch: "RolloutBatch", credit: Credit, ctx: Any) -> dict[str, float]:
        return {}

    def state_values(self, states: list[list[int]], problems: list["Problem"], prompt_lens: list[int], ctx: Any,
                     rewards: list[float | None]) -> torch.Tensor | None:
        """V̂ of arbitrary states, [N] float32: ``states[i]`` is a token prefix (prompt + the first tokens of a response)
        of ``problems[i]``, whose prompt is its first ``prompt_lens[i]`` tokens; where ``rewards[i]`` is not None,
        ``states[i]`` is a whole, finished response that earned that reward. None (the default): the strategy values a
        state only through the response it lies on (a group baseline), so it cannot tell alternatives apart."""
        return None

    def load_learned(self, checkpoint: Path, ctx: Any) -> None:
        """For an estimator that is ``learned``: make it ready to credit responses outside training (``rlzoo audit``)
        from a checkpoint folder of one of its runs (``checkpoints/iter_N``); called instead of ``setup``. Raise a
        UserError naming what is missing if the checkpoint lacks it."""
        raise NotImplementedError(f"{type(self).__name__} is learned but does not say how to load it (load_learned)")

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the estimator: tensors and plain values (numbers, strings, lists, dicts) only,
        since checkpoints load with ``torch.load(weights_only=True)``, which refuses any other object."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_estimator(name: str, **overrides) -> Estimator:
    """The estimator registered as ``name``, configured by gin bindings (``overrides`` win)."""
    return ESTIMATORS.get(name)(**overrides)
