"""Third-party strategies: a tiny package installed during the test is found by name through the
``rlzoo.estimators`` entry point, and runs on a real rollout batch."""

import subprocess
import sys
import textwrap

PLUGIN = '''
from dataclasses import dataclass

import gin

from rlzoo.algorithms import Credit, Estimator


@gin.configurable("mean_baseline")
@dataclass
class MeanBaseline(Estimator):
    group_size: int = 2  # samples per prompt

    def advantages(self, batch, ctx):
        scores = batch.token_rewards.sum(-1)  # [B]
        return Credit(advantages=(scores - scores.mean())[:, None] * batch.response_mask)
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "rlzoo-plugin-example"
version = "0.0.1"

[project.entry-points."rlzoo.estimators"]
mean_baseline = "rlzoo_plugin_example:MeanBaseline"
'''


def test_an_installed_package_registers_an_estimator_through_the_entry_point(tmp_path, tiny_policy_path):
    package = tmp_path / "plugin"
    package.mkdir()
    (package / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (package / "rlzoo_plugin_example.py").write_text(textwrap.dedent(PLUGIN))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(package)], check=True)

    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    listed = subprocess.run([sys.executable, "-m", "rlzoo.cli", "list"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "mean_baseline" in listed.stdout

    run = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "rlzoo.cli", "train", "--algo", "mean_baseline", "--model", str(tiny_policy_path),
         "--out", str(run), "--budget", "iterations=1", "--set", "train.prompts_per_iteration=2",
         "--set", "train.eval_train_problems=2", "--set", "train.eval_test_problems=2", "--set", "train.eval_samples=1",
         "--set", "mean_baseline.group_size=3"],
        env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    assert '"algo": "mean_baseline"' in (run / "run.json").read_text()
    assert "mean_baseline.group_size = 3" in (run / "config.gin").read_text()
