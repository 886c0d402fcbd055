"""Every random draw of rlzoo derives its seed here: one mixing function and one table of named salts.

A draw is identified by the run's (or the audit's) seed, an iteration and a purpose (its salt), so that
two purposes never share noise and a resumed run draws what an uninterrupted one would. The numbers
are the ones rlzoo has always used: runs made before this module existed reproduce bit for bit.
"""

from __future__ import annotations

MODULUS = 2**31 - 1  # seeds stay below it (vLLM and numpy take 32-bit seeds)


def derive_seed(seed: int, iteration: int = 0, salt: int = 0) -> int:
    """A distinct, reproducible seed for each (seed, iteration, purpose): (seed·1_000_003 + iteration·10_007 + salt) mod (2³¹ − 1)."""
    return (seed * 1_000_003 + iteration * 10_007 + salt) % MODULUS


def substream(seed: int, salt: int) -> int:
    """A second stream of a seed already derived for a purpose (``seed + salt``): an estimator's own draws within
    its iteration, off the iteration's sampling seed (``ctx.sampling.seed``), so that they follow it wherever the
    estimator runs (training, the audit) without knowing how it was derived."""
    return seed + salt


class Salt:
    """The purposes a seed is drawn for, by name. The values are part of every result's reproducibility: never renumber
    one. Salts of different callers may coincide: they mix with different (seed, iteration) streams."""

    # rlzoo train, with (run seed, iteration)
    ROLLOUTS = 1  # the policy's samples of the iteration (ctx.sampling.seed)
    PPO_MINIBATCHES = 3  # the PPO update's minibatch order
    PROMPT_ORDER = 17  # the permutation of the train split for pass ("iteration") k
    EVAL_SUBSET = 23  # the fixed train subset that is evaluated
    EVAL = 29  # every evaluation's sampling
    # estimators, with (ctx.seed, ctx.iteration), or as a substream of ctx.sampling.seed
    CRITIC_MINIBATCHES = 1  # value_ppo's critic minibatch order: iteration strides by 7 there (salt + 7·iteration), as always
    MC = 7919  # substream of ctx.sampling.seed for Monte-Carlo continuations (VinePPO, SPO-chain): not the rollouts' noise
    MC_ROUND = 104_729  # vineppo_adaptive: round r of continuations draws from substream MC + r·MC_ROUND (fresh noise per round)
    MC_ORDER = 31  # vineppo_adaptive, with (ctx.seed, ctx.iteration): the order in which a short budget serves unsettled states
    PRM_MINIBATCHES = 37  # prime, with (ctx.seed, ctx.iteration): the implicit PRM's minibatch order
    TREE_LEVEL = 41  # spo_tree, with (ctx.sampling.seed, depth): the segments of tree level depth >= 1 (level 0 is the rollouts')
    # rlzoo audit, with (audit seed, 0): a stride of 10_007 apart, as the audit's draws have always been
    AUDIT_RESPONSES = 1 * 10_007
    AUDIT_ESTIMATORS = 2 * 10_007  # ctx.sampling.seed of the estimators' own draws
    AUDIT_TRUTH = 3 * 10_007
    AUDIT_ALTERNATIVES = 4 * 10_007
    AUDIT_STATE_VALUES = 5 * 10_007  # an estimator's draws valuing the alternatives
