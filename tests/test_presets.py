"""Every preset in benchmarks/ parses and builds its objects (the paper recipes are never run on CPU)."""

import re
from pathlib import Path

import pytest

from rlzoo.algorithms import ESTIMATORS, build_estimator
from rlzoo.config import apply_gin
from rlzoo.ppo import PPOConfig
from rlzoo.tasks import get_task
from rlzoo.train import TrainConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("preset", sorted(p.name for p in BENCHMARKS.glob("*.gin")))
def test_preset_parses_and_builds(preset):
    apply_gin([BENCHMARKS / preset])
    cfg, ppo = TrainConfig(), PPOConfig()
    assert cfg.prompts_per_iteration > 0 and ppo.epochs >= 1
    # A bench preset gives every strategy the same samples per prompt; speed.gin configures only the strategies
    # that the commit it is compared with (7704100) knows, since one file drives both sides of that comparison.
    named = set(re.findall(r"^(\w+)\.group_size", (BENCHMARKS / preset).read_text(), re.M))
    named = {"ppo" if n == "value_ppo" else n for n in named}  # the strategy "ppo" is configured as value_ppo.*
    strategies = sorted(named) if preset == "speed.gin" else ESTIMATORS.names()
    group_sizes = {build_estimator(name).group_size for name in strategies}
    assert len(group_sizes) == 1, f"{preset}: strategies sample different numbers per prompt: {group_sizes}"
    for task in ("arith", "gsm8k", "math"):
        get_task(task)
    if getattr(cfg, "deepspeed_config", None):
        assert (BENCHMARKS.parent / cfg.deepspeed_config).is_file()


def test_paper_recipes_use_the_papers_hyperparameters():
    apply_gin([BENCHMARKS / "paper_rho1b_math.gin"])
    cfg, ppo, vine = TrainConfig(), PPOConfig(), build_estimator("vineppo")
    assert (cfg.prompts_per_iteration, vine.group_size, vine.k) == (64, 8, 9)
    assert (cfg.temperature, cfg.top_p, cfg.eval_samples, cfg.eval_temperature) == (0.6, 0.9, 16, 0.35)
    assert (ppo.clip_eps, ppo.kl_mode, ppo.kl_coef, ppo.epochs, ppo.whiten_advantages) == (0.2, "k3-loss", 1e-4, 2, True)
    assert (cfg.lr, cfg.warmup_ratio, cfg.engine) == (1e-6, 0.03, "vllm")
    value = build_estimator("ppo")
    assert (value.gamma, value.lam) == (1.0, 1.0)


@pytest.mark.parametrize("preset", ["paper_rho1b_math.gin", "paper_rho1b_gsm8k.gin"])
def test_paper_presets_follow_the_reference_trainer(preset):
    """McGill-NLP/VinePPO: 512 episodes per iteration in optimizer batches of 64 (8 steps per epoch, 2 epochs),
    WarmupDecayLR (3% warm-up, linear decay to 0), and a critic trained with the actor's learning rate, schedule,
    AdamW betas and minibatches."""
    apply_gin([BENCHMARKS / preset])
    cfg, ppo, value = TrainConfig(), PPOConfig(), build_estimator("ppo")
    episodes = cfg.prompts_per_iteration * build_estimator("vineppo").group_size
    assert episodes == 512 and episodes // ppo.minibatches == 64 and ppo.epochs == 2
    assert (cfg.lr_schedule, cfg.warmup_ratio, cfg.lr) == ("linear", 0.03, 1e-6)
    assert (value.critic_lr, value.critic_lr_schedule, tuple(value.critic_betas)) == (cfg.lr, "policy", (0.9, 0.999))
    assert (value.critic_epochs, value.critic_minibatches) == (ppo.epochs, ppo.minibatches)
    assert (value.gamma, value.lam, value.value_clip) == (1.0, 1.0, 0.2)
