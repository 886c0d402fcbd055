"""Shared fixtures. The tiny built-in policy is built once into the repo-local, git-ignored ``.rlzoo/``
(RLZOO_HOME), so a rerun of the suite finds it cached."""

import os
from pathlib import Path

import pytest

# Before anything imports transformers / huggingface_hub (they read these once): tests never touch the network,
# and everything rlzoo builds goes to the repo-local cache.
os.environ["HF_HUB_OFFLINE"] = "1"
# The test models are tiny: one thread is as fast as two, and twice as fast when the other core is busy.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["RLZOO_HOME"] = str(Path(__file__).resolve().parents[1] / ".rlzoo")

from rlzoo.policy import preset_task_bindings  # noqa: E402  (after the environment: torch reads OMP_NUM_THREADS)


@pytest.fixture(scope="session")
def tiny_policy_path() -> Path:
    """Folder of the tiny built-in policy (``pretrain --preset tiny``): SFT on an easy arith, built in seconds."""
    import gin

    from rlzoo.policy import pretrain, pretrain_config

    gin.clear_config()  # the tiny preset as defined, whatever bindings an earlier test left behind
    return pretrain(pretrain_config("tiny"), progress=False)


# The arith knobs the tiny policy was pretrained on (rlzoo.policy.PRESETS["tiny"]): runs on it bind these.
TINY_ARITH = preset_task_bindings("tiny")


@pytest.fixture(autouse=True)
def _fresh_gin():
    """Gin bindings are process-global: each test starts from none, whatever the previous one bound."""
    import gin

    gin.clear_config()
    yield
