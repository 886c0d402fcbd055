"""Shared fixtures. The tiny built-in policy is built once into the repo-local, git-ignored ``.rlzoo/``
(RLZOO_HOME), so a rerun of the suite finds it cached."""

import os
from pathlib import Path

import pytest

# Before anything imports transformers / huggingface_hub (they read these once): tests never touch the network,
# and everything rlzoo builds goes to the repo-local cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RLZOO_HOME"] = str(Path(__file__).resolve().parents[1] / ".rlzoo")


@pytest.fixture(scope="session")
def tiny_policy_path() -> Path:
    """Folder of the tiny built-in policy (``pretrain --preset tiny``): SFT on an easy arith, built in seconds."""
    import gin

    from rlzoo.policy import pretrain, pretrain_config

    gin.clear_config()  # the tiny preset as defined, whatever bindings an earlier test left behind
    return pretrain(pretrain_config("tiny"), progress=False)
