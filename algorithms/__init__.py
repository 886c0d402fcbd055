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
(third-party packages: ``name = "package.module:EstimatorClass"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rlzoo.errors import check_ranges
from rlzoo.registry import Registry

if TYPE_CHECKING:
    from rlzoo.rollout import RolloutBatch

ESTIMATORS: Registry = Registry(
    "estimator",
    "rlzoo.estimators",
    builtin_modules=(
        "rlzoo.algorithms.value_ppo",
        "rlzoo.algorithms.grpo",
        "rlzoo.algorithms.rloo",
        "rlzoo.algorithms.vineppo",
        "rlzoo.algorithms.reinforce",
        "rlzoo.algorithms.vineppo_adaptive",
        "rlzoo.algorithms.spo_chain",
        "rlzoo.algorithms.prime",
        "rlzoo.algorithms.spo_tree",
    ),
)


@dataclass
class Credit:
    advantages: torch.Tensor  # [B, L] float32, 0 outside the response mask
    returns: torch.Tensor | None = None  # [B, L] float32: critic targets, for strategies with a critic
    values: torch.Tensor | None = None  # [B, L] float32: the estimate of V(state before token i), if any
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

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the estimator: tensors and plain values (numbers, strings, lists, dicts) only,
        since checkpoints load with ``torch.load(weights_only=True)``, which refuses any other object."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_estimator(name: str, **overrides) -> Estimator:
    """The estimator registered as ``name``, configured by gin bindings (``overrides`` win)."""
    return ESTIMATORS.get(name)(**overrides)
