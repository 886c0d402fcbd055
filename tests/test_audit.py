"""The credit audit: the ground truth on a toy whose state values are known exactly, the metrics against
hand-computed values (ties included), a smoke audit on the tiny built-in policy, and one-line errors."""

import json
import os

import numpy as np
import pytest
import torch

from rlzoo.audit import (
    AuditConfig,
    absolute_errors,
    audit,
    binomial_se,
    bootstrap_ci,
    html_section,
    mc_values,
    pairwise_ranking,
    portable_command,
    shown_path,
    sign_agreement,
)
from rlzoo.cli import main
from rlzoo.engine import SamplingParams
from rlzoo.errors import UserError
from rlzoo.policy import build_char_tokenizer
from rlzoo.rollout import EstimatorContext
from rlzoo.runs import write_run
from rlzoo.tasks import Problem
from toy import KnownPolicyEngine, StepTask, true_value

# ----------------------------------------------------------------------------- a toy with known values

def toy():
    tokenizer = build_char_tokenizer("gb\nQ0123456789")
    prompt_len = len(tokenizer("Q0")["input_ids"])  # every prompt is "Q" and a digit
    return tokenizer, StepTask(), KnownPolicyEngine(tokenizer, prompt_len), prompt_len


def test_ground_truth_lands_within_its_standard_error_on_known_values():
    tokenizer, task, engine, prompt_len = toy()
    prefixes = ["", "g\n", "g\ng\n", "b\n", "g\nb\n"]
    states = [tokenizer("Q0" + p)["input_ids"] for p in prefixes]
    problem = Problem("toy/0", "Q0", "")
    n, z_scores = 256, []
    for seed in range(20):
        ctx = EstimatorContext(policy=None, tokenizer=tokenizer, engine=engine, task=task, sampling=SamplingParams(),
                               model_path="", device=torch.device("cpu"), seed=seed)
        values = mc_values(ctx, states, [problem] * len(states), [prompt_len] * len(states),
                           SamplingParams(n=n, max_new_tokens=6, seed=seed), purpose="truth").numpy()
        se = binomial_se(values, n)
        for prefix, v, s in zip(prefixes, values, se):
            exact = true_value(prefix)
            assert abs(v - exact) <= 4 * (exact * (1 - exact) / n) ** 0.5 + 1e-12, (prefix, v, exact)
            if 0 < exact < 1:
                z_scores.append((v - exact) / s)
        assert ctx.tokens["truth"] > 0
    # the reported standard error is the spread it claims: about 95% within 2 SE, z-scores of unit spread
    z = np.array(z_scores)
    assert np.mean(np.abs(z) <= 2) >= 0.85 and 0.75 <= z.std() <= 1.3, (np.mean(np.abs(z) <= 2), z.std())


def toy_audit() -> dict:
    """The audit of vineppo, grpo and rloo on the toy: 6 problems x 4 responses, 256 truth samples."""
    import gin

    from rlzoo.config import apply_gin

    tokenizer, task, engine, _ = toy()
    problems = [Problem(f"toy/{i}", f"Q{i}", "") for i in range(6)]
    cfg = AuditConfig(algos=("vineppo", "grpo", "rloo"), problems=6, truth_samples=256, alternatives=4, resamples=200)
    apply_gin([], ["vineppo.group_size = 4", "vineppo.k = 4", "grpo.group_size = 4", "rloo.group_size = 4"])
    try:
        return audit(None, tokenizer, engine, task, problems, cfg)
    finally:
        gin.clear_config()


def test_toy_audit_end_to_end_against_known_values():
    result = toy_audit()
    per_state = result["per_state"]
    assert result["responses"]["responses"] == 24 and len(per_state["truth"]) == 3 * 24  # 3 steps per response
    # every state's truth within 4 standard errors of its exact value; true advantages are its differences
    for i, (truth, row, step) in enumerate(zip(per_state["truth"], per_state["response"], per_state["step"])):
        text = result["response_texts"][row]
        exact = true_value(text[: 2 * step])
        assert abs(truth - exact) <= 4 * (exact * (1 - exact) / 256) ** 0.5 + 1e-12, (text, step, truth, exact)
        following = per_state["truth"][i + 1] if step < 2 else float(text == "g\ng\ng\n")
        assert per_state["true_advantage"][i] == pytest.approx(following - truth)
    # group baselines value all alternatives of a state alike: every non-tied pair is a predicted tie
    assert result["ranking"]["pairs_not_tied_in_truth"] > 0
    for name in ("grpo", "rloo"):
        assert result["strategies"][name]["ranking_accuracy"]["mean"] == 0.5
        assert set(per_state[f"{name}/value"][:3]) == {per_state[f"{name}/value"][0]}  # one value per response
    # VinePPO's MC values are an estimate of the same thing: its error is bounded, its compute counted
    vine = result["strategies"]["vineppo"]
    assert vine["options"] == {"k": 4} and vine["compute"]["tokens_generated"] > 0 and 0 <= vine["value_mae"]["mean"] < 0.35
    assert set(vine["mae_by_step"]) == {"0", "1", "2"}
    for metric in ("value_mae", "sign_agreement", "ranking_accuracy"):
        m = vine[metric]
        assert m["ci"][0] <= m["mean"] <= m["ci"][1]


def test_the_report_joins_the_leaderboard_page(tmp_path):
    from test_leaderboard import write_run_folder

    from rlzoo.audit import leaderboard_sections, write_report
    from rlzoo.leaderboard import PLOTS, write_leaderboard
    from rlzoo.runs import find_runs

    board = tmp_path / "leaderboard"
    write_report(toy_audit(), board / "audit")
    for plot in ("mae_by_step", "ranking_accuracy"):
        assert (board / "audit" / f"{plot}.png").stat().st_size > 0 and (board / "audit" / f"{plot}.svg").stat().st_size > 0
    md = (board / "audit" / "audit.md").read_text()
    assert "| vineppo (k=4) |" in md and "| grpo |" in md and "![mae_by_step](mae_by_step.png)" in md
    assert json.loads((board / "audit" / "audit.json").read_text())["strategies"]["grpo"]["ranking_accuracy"]["mean"] == 0.5

    for algo in ("ppo", "grpo"):
        write_run_folder(tmp_path / "runs" / algo, algo, 0, {0: (0.4, 0.4), 5: (0.6, 0.5)})
    write_leaderboard(find_runs([tmp_path / "runs"]), board, sections=leaderboard_sections(board))
    page, readme = (board / "index.html").read_text(), (board / "README.md").read_text()
    assert "Credit audit" in page and page.count("data:image/png;base64") == len(PLOTS) + 2  # the leaderboard's plots and the audit's
    assert "Credit audit" in readme and "(audit/mae_by_step.png)" in readme


# ----------------------------------------------------------------------------- metrics by hand


def test_value_mae_by_hand():
    errors = absolute_errors([0.5, 0.2, 1.0, 0.0], [0.25, 0.2, 0.5, 0.5])
    assert errors.tolist() == [0.25, 0.0, 0.5, 0.5]
    assert bootstrap_ci(errors, [0, 0, 1, 1])["mean"] == pytest.approx(0.3125)


def test_sign_agreement_by_hand_with_ties():
    predicted = [0.3, -0.1, 0.0, 0.2, 0.5]
    truth = [0.1, 0.2, -0.4, 0.0, 0.3]  # step 3 has no true sign: skipped
    scores, kept = sign_agreement(predicted, truth)
    assert scores.tolist() == [1.0, 0.0, 0.5, 1.0] and kept.tolist() == [True, True, True, False, True]
    assert scores.mean() == 0.625


def test_pairwise_ranking_by_hand_with_ties():
    predicted = [0.7, 0.7, 0.1, 0.4]
    truth = [0.9, 0.5, 0.5, 0.2]
    # (0,1) predicted tie 0.5; (0,2) 1; (0,3) 1; (1,2) tied in truth: skipped; (1,3) 1; (2,3) reversed 0
    assert pairwise_ranking(predicted, truth) == [0.5, 1.0, 1.0, 1.0, 0.0]
    assert pairwise_ranking([0.3, 0.3, 0.3], [0.9, 0.5, 0.1]) == [0.5, 0.5, 0.5]  # a constant predictor is chance
    assert pairwise_ranking([1.0, 0.0], [0.4, 0.4]) == []


def test_bootstrap_resamples_whole_problems():
    scores, clusters = [1.0, 1.0, 1.0, 0.0, 0.5, 0.5], [0, 0, 0, 1, 2, 2]
    m = bootstrap_ci(scores, clusters, resamples=500, seed=3)
    assert m["mean"] == pytest.approx(4 / 6) and m["n"] == 6 and m["clusters"] == 3
    assert 0.0 <= m["ci"][0] < m["mean"] < m["ci"][1] <= 1.0
    assert bootstrap_ci(scores, clusters, resamples=500, seed=3) == m  # seeded
    assert bootstrap_ci([0.2, 0.2, 0.2], [0, 1, 2])["ci"] == [pytest.approx(0.2), pytest.approx(0.2)]
    assert bootstrap_ci([0.2, 0.4], [7, 7])["ci"] == [None, None]  # one problem: no interval
    assert bootstrap_ci([], [])["mean"] is None


# ----------------------------------------------------------------------------- the command


SMALL = ["train.prompts_per_iteration=2", "ppo.epochs=1", "ppo.minibatches=1", "value_ppo.critic_minibatches=1",
         "value_ppo.group_size=2", "grpo.group_size=2", "rloo.group_size=2", "vineppo.group_size=2",
         "vineppo.k=2", "arith.test_size=20", "arith.ood_test_size=20"]


def _cli(*args):
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def test_commands_and_paths_are_recorded_from_the_report_folder(tmp_path, monkeypatch):
    (tmp_path / "runs" / "ppo-seed0").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    out = tmp_path / "board" / "audit"
    assert shown_path(str(tmp_path / "runs" / "ppo-seed0"), out) == "../../runs/ppo-seed0"
    assert shown_path("../runs/ppo-seed0", out) == "../../runs/ppo-seed0"  # relative to where it was given
    assert shown_path("default", out) == "default" and shown_path("org/model-on-the-hub", out) == "org/model-on-the-hub"
    command = f"rlzoo audit --critic {tmp_path}/runs/ppo-seed0 --task arith --out {out} --set vineppo.k=9"
    assert portable_command(command, out) == "rlzoo audit --critic ../../runs/ppo-seed0 --task arith --out . --set vineppo.k=9"
    assert portable_command(f"rlzoo audit --policy=../runs/ppo-seed0 --out={out}", out) == \
        "rlzoo audit --policy=../../runs/ppo-seed0 --out=."


@pytest.mark.slow  # 6 s on an idle 2-core machine, about a minute when it is shared
def test_smoke_audit_on_the_tiny_policy_writes_table_plots_and_json(tiny_policy_path, tmp_path):
    from test_leaderboard import write_run_folder

    out = tmp_path / "leaderboard" / "audit"
    sets = [x for b in SMALL for x in ("--set", b)]
    args = ["audit", "--policy", tiny_policy_path, "--problems", 2, "--truth-samples", 4, "--alternatives", 2,
            "--critic-iterations", 1, "--out", out, *sets]
    code = _cli(*args)
    assert code == 0
    result = json.loads((out / "audit.json").read_text())
    assert list(result["strategies"]) == ["ppo", "vineppo", "grpo", "rloo"]
    for s in result["strategies"].values():
        assert s["value_mae"]["n"] == result["responses"]["states"] and "0" in s["mae_by_step"]
    assert result["critics"]["ppo"]["trained_here"] and result["strategies"]["ppo"]["compute"]["forward_passes"] == 4
    for plot in ("mae_by_step", "ranking_accuracy"):
        assert (out / f"{plot}.png").stat().st_size > 0 and (out / f"{plot}.svg").stat().st_size > 0
    md = (out / "audit.md").read_text()
    assert "| ppo |" in md and "value MAE" in md and "![mae_by_step](mae_by_step.png)" in md
    assert "Credit audit" in html_section(out) and "data:image/png;base64" in html_section(out)

    # the critic run it trained serves as --critic, and its policy as the default policy
    again = tmp_path / "again"
    assert _cli("audit", "--algos", "ppo", "--critic", out / "critic-ppo-1it", "--problems", 1, "--truth-samples", 2,
                "--alternatives", 2, "--out", again, *sets) == 0
    result = json.loads((again / "audit.json").read_text())
    assert result["policy"] == "../leaderboard/audit/critic-ppo-1it" and result["critics"]["ppo"]["trained_here"] is False
    assert result["policy_loaded"] == "../leaderboard/audit/critic-ppo-1it/checkpoints/iter_000001/policy"
    assert result["critics"]["ppo"]["checkpoint"] == "../leaderboard/audit/critic-ppo-1it/checkpoints/iter_000001"

    # No machine paths in what gets committed: the audit, and the leaderboard page it joins
    for algo in ("ppo", "grpo"):
        write_run_folder(tmp_path / "runs" / algo, algo, 0, {0: (0.4, 0.4), 5: (0.6, 0.5)})
    assert _cli("leaderboard", tmp_path / "runs", "--out", tmp_path / "leaderboard") == 0
    written = [p for folder in (tmp_path / "leaderboard", again) for p in folder.rglob("*")
               if p.suffix in (".md", ".json", ".csv", ".html")]
    assert {"audit.json", "audit.md", "README.md", "index.html", "results.json", "runs.csv"} <= {p.name for p in written}
    for p in written:
        assert str(tmp_path) not in p.read_text(), p
    # the command as given to main (not this process's sys.argv: pytest's), its paths from the audit's folder
    provenance = json.loads((out / "audit.json").read_text())["provenance"]["command"]
    assert provenance.startswith(f"rlzoo audit --policy {shown_path(str(tiny_policy_path), out)} --problems 2 --truth-samples 4 "
                                 "--alternatives 2 --critic-iterations 1 --out . --set "), provenance
    # the leaderboard one folder up names the policy by its path from there
    from_board = os.path.relpath(tiny_policy_path.resolve(), (tmp_path / "leaderboard").resolve())
    assert f"Credit audit — arith, policy {from_board}" in \
        (tmp_path / "leaderboard" / "README.md").read_text()


def test_critic_values_of_prefixes_equal_the_critics_values_inside_whole_rows(tiny_policy_path, tmp_path):
    """ppo's value of a state read from a whole response row (the estimator) equals its ``state_values`` of the
    state alone (used for alternatives; a finished response valued before its last token); and ``load_learned``
    restores a saved critic exactly."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from rlzoo.algorithms import build_estimator
    from rlzoo.algorithms.value_ppo import ValueModel

    critic = ValueModel(str(tiny_policy_path))
    torch.manual_seed(0)
    torch.nn.init.normal_(critic.head.weight, std=0.5)
    rows = [[1, 5, 6, 7, 8, 9, 10], [1, 6, 6, 9]]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        whole = critic(ids, mask)  # [2, 7]: whole[b, i] = V(rows[b][:i])
    prefixes = [(b, i) for b, r in enumerate(rows) for i in range(1, len(r))]
    estimator, ctx = build_estimator("ppo", micro_batch_size=3), SimpleNamespace(device=torch.device("cpu"))
    estimator.critic = critic
    alone = estimator.state_values([rows[b][:i] for b, i in prefixes], [None] * len(prefixes), [1] * len(prefixes), ctx,
                                   [None] * len(prefixes))
    assert torch.allclose(alone, torch.stack([whole[b, i] for b, i in prefixes]), atol=1e-5)
    finished = estimator.state_values([rows[0]], [None], [1], ctx, [1.0])  # the whole response: V before its last token
    assert torch.allclose(finished, whole[0, len(rows[0]) - 1 :len(rows[0])], atol=1e-5)

    checkpoint = tmp_path / "iter_000001"
    (checkpoint / "policy").mkdir(parents=True)
    for f in tiny_policy_path.iterdir():
        (checkpoint / "policy" / f.name).write_bytes(f.read_bytes())
    save_file({k: v.contiguous() for k, v in critic.state_dict().items()}, str(checkpoint / "critic.safetensors"))
    loaded = build_estimator("ppo")
    loaded.load_learned(checkpoint, ctx)
    assert all(torch.equal(a, b) for a, b in zip(loaded.critic.state_dict().values(), critic.state_dict().values()))
    (checkpoint / "critic.safetensors").unlink()
    with pytest.raises(UserError, match="no critic.safetensors"):
        loaded.load_learned(checkpoint, ctx)


def _run_folder(path, algo, task):
    path.mkdir(parents=True)
    write_run(path, {"format": 1, "algo": algo, "task": task, "model": "default", "seed": 0, "status": "finished"})
    return path


@pytest.mark.parametrize("args, says", [
    (["--algos", "ppo", "--critic-iterations", "0"], "needs a critic"),
    (["--alternatives", "0"], "--alternatives 0"),
    (["--alternatives", "1"], "at least 2"),
    (["--truth-samples", "1"], "--truth-samples 1"),
    (["--algos", "vinepo"], "known: "),
    (["--algos", "grpo", "--policy", "{tiny}", "--task", "gsm8k"], "trained on task 'arith', not 'gsm8k'"),
    (["--algos", "grpo", "--task", "gsm8k"], "trained on task 'arith', not 'gsm8k'"),  # the built-in default
    (["--algos", "grpo", "--policy", "{gsm8k_run}"], "run on task 'gsm8k', not 'arith'"),
    (["--critic", "{gsm8k_run}"], "run on task 'gsm8k', not 'arith'"),
    (["--critic", "{grpo_run}"], "has no critic"),
    (["--critic", "{tiny}"], "not a run folder"),
    (["--algos", "ppo", "--critic", "{ppo_run}", "--critic", "{ppo_run}"], "more than one ppo run"),
])
def test_bad_input_is_one_line_and_exit_2(args, says, tiny_policy_path, tmp_path, capsys):
    paths = {"tiny": tiny_policy_path, "gsm8k_run": _run_folder(tmp_path / "g", "ppo", "gsm8k"),
             "grpo_run": _run_folder(tmp_path / "r", "grpo", "arith"), "ppo_run": _run_folder(tmp_path / "p", "ppo", "arith")}
    out = tmp_path / "audit"
    code = _cli("audit", *[a.format(**paths) for a in args], "--out", out)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rlzoo: error: ") and says in err and err.count("\n") == 1, err
    assert not out.exists()


# ----------------------------------------------------------------------------- the strategies of issue 15


def test_toy_audit_covers_adaptive_mc_and_a_shape_owning_loss_masking_strategy():
    """vineppo_adaptive values the alternatives by its own budget rule (state_values); spo_tree, which samples trees
    in training, is credited on the audit's groups (each response one path of its tree) and ranks no alternatives."""
    import gin

    from rlzoo.config import apply_gin

    tokenizer, task, engine, _ = toy()
    problems = [Problem(f"toy/{i}", f"Q{i}", "") for i in range(6)]
    cfg = AuditConfig(algos=("vineppo_adaptive", "spo_tree", "grpo"), problems=6, truth_samples=256, alternatives=4, resamples=200)
    apply_gin([], ["vineppo_adaptive.group_size = 4", "grpo.group_size = 4", "spo_tree.branch_factors = (4,)"])
    try:
        result = audit(None, tokenizer, engine, task, problems, cfg)
    finally:
        gin.clear_config()
    assert result["responses"]["responses"] == 24 and result["ranking"]["pairs_not_tied_in_truth"] > 0
    adaptive, tree = result["strategies"]["vineppo_adaptive"], result["strategies"]["spo_tree"]
    assert adaptive["options"] == {"k_first": 3, "budget": 4.5} and adaptive["compute"]["tokens_generated"] > 0
    assert 0 <= adaptive["value_mae"]["mean"] < 0.35
    assert adaptive["ranking_accuracy"]["mean"] > 0.6  # its MC values tell a "b" step (worth 0) from a "g" step
    # spo_tree on a batch it did not sample: one root per prompt, valued by the mean of its leaves (the group mean)
    assert tree["ranking_accuracy"]["mean"] == 0.5 and tree["compute"]["tokens_generated"] == 0
    assert result["per_state"]["spo_tree/value"] == result["per_state"]["grpo/value"]
    assert tree["sign_agreement"]["n"] > 0
    from rlzoo.audit import tables

    assert "vineppo_adaptive (k_first=3, budget=4.5)" in [row[0] for row in tables(result)[0][3]]


def _prime_checkpoint(tiny_policy_path, tmp_path, record_model: bool):
    """A prime run's checkpoint as the loop writes it: policy/ and prm/ (a PRM moved away from its start)."""
    import shutil

    from transformers import AutoModelForCausalLM

    run = tmp_path / "prime-run"
    checkpoint = run / "checkpoints" / "iter_000001"
    shutil.copytree(tiny_policy_path, checkpoint / "policy")
    prm = AutoModelForCausalLM.from_pretrained(tiny_policy_path)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in prm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prm.save_pretrained(checkpoint / "prm")
    if record_model:
        write_run(run, {"format": 1, "algo": "prime", "task": "arith", "model": str(tiny_policy_path), "seed": 0})
    return checkpoint


def test_prime_loads_its_prm_and_values_prefixes_as_its_credit_does(tiny_policy_path, tmp_path):
    """prime's ``load_learned`` restores the PRM of a checkpoint and its π_ref (the run's start model); its
    ``state_values`` of a prefix equals ``Credit.values`` at that position of a whole row; a finished response
    is valued by the PRM's prediction of its outcome."""
    from types import SimpleNamespace

    from conftest import TINY_ARITH
    from rlzoo.algorithms import build_estimator
    from rlzoo.config import apply_gin
    from rlzoo.engine import Completion
    from rlzoo.policy import load_policy
    from rlzoo.rollout import build_batch
    from rlzoo.tasks import get_task

    apply_gin([], TINY_ARITH)
    policy, tokenizer = load_policy(str(tiny_policy_path))
    task = get_task("arith")
    checkpoint = _prime_checkpoint(tiny_policy_path, tmp_path, record_model=True)
    prime, ctx = build_estimator("prime", group_size=2, beta=0.5, micro_batch_size=3), SimpleNamespace(device=torch.device("cpu"))
    prime.load_learned(checkpoint, ctx)
    assert all(torch.equal(a, b) for a, b in zip(prime.reference.state_dict().values(), policy.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(prime.critic.state_dict().values(), policy.state_dict().values()))

    problems = task.problems("train")[:2]
    prompt_ids = [tokenizer(task.prompt(p), add_special_tokens=True)["input_ids"] for p in problems]
    responses = ["1+2=3\n", "7", "12\n", "4-1=3"]
    completions = [[Completion(tokenizer(r, add_special_tokens=False)["input_ids"], r, "stop") for r in responses[2 * p : 2 * p + 2]]
                   for p in range(2)]
    batch = build_batch(tokenizer, task, problems, prompt_ids, completions, [1.0, 0.0, 0.0, 1.0])
    credit = prime.advantages(batch, ctx)
    rows = [(b, i) for b in range(batch.size) for i in range(int(batch.prompt_lens[b]), int(batch.last_token_index()[b]) + 1)]
    alone = prime.state_values([batch.input_ids[b, :i].tolist() for b, i in rows], [batch.problems[b] for b, _ in rows],
                               [int(batch.prompt_lens[b]) for b, _ in rows], ctx, [None] * len(rows))
    assert torch.allclose(alone, torch.stack([credit.values[b, i] for b, i in rows]), atol=1e-5)
    assert len(set(alone.tolist())) > 2  # the PRM tells prefixes apart
    whole = [batch.input_ids[b, : int(batch.last_token_index()[b]) + 1].tolist() for b in range(batch.size)]
    finished = prime.state_values(whole, batch.problems, batch.prompt_lens.tolist(), ctx, batch.scores.tolist())
    log_ratio = prime._logprobs(prime.critic, batch, ctx.device) - prime._logprobs(prime.reference, batch, ctx.device)
    assert torch.allclose(finished, torch.sigmoid(0.5 * (log_ratio * batch.response_mask).sum(-1)), atol=1e-5)

    # a checkpoint outside a run folder: π_ref is its own policy; one without prm/ is one line
    bare = _prime_checkpoint(tiny_policy_path, tmp_path / "bare", record_model=False)
    build_estimator("prime").load_learned(bare, ctx)
    (checkpoint / "prm" / "config.json").unlink()
    with pytest.raises(UserError, match="no prm/"):
        build_estimator("prime").load_learned(checkpoint, ctx)


def test_smoke_audit_of_the_2025_strategies_trains_primes_prm_and_ranks_by_state_values(tiny_policy_path, tmp_path):
    """Not slow (~10 s): the one test of a learned strategy other than ppo through `rlzoo audit`'s own training."""
    out = tmp_path / "audit"
    sets = SMALL + ["vineppo_adaptive.group_size=2", "spo_chain.group_size=2", "spo_chain.k=2", "spo_chain.cutpoint_interval=1",
                    "prime.group_size=2", "spo_tree.branch_factors=(2,)", "spo_tree.segment_tokens=4"]
    assert _cli("audit", "--algos", "vineppo_adaptive,spo_chain,spo_tree,prime,grpo", "--policy", tiny_policy_path,
                "--problems", 4, "--truth-samples", 8, "--alternatives", 3, "--critic-iterations", 1, "--out", out,
                *[x for b in sets for x in ("--set", b)]) == 0
    result = json.loads((out / "audit.json").read_text())
    assert list(result["strategies"]) == ["vineppo_adaptive", "spo_chain", "spo_tree", "prime", "grpo"]
    assert list(result["critics"]) == ["prime"] and result["critics"]["prime"]["trained_here"]
    assert (out / "critic-prime-1it" / "checkpoints" / "iter_000001" / "prm" / "config.json").is_file()
    states = result["responses"]["states"]
    for name, s in result["strategies"].items():
        assert s["value_mae"]["n"] == states, name
    prime = result["strategies"]["prime"]
    assert prime["compute"]["forward_passes"] == result["responses"]["responses"]  # the PRM's rows
    assert all(0 < v < 1 for v in result["per_state"]["prime/value"])  # sigmoid of the implicit reward
    for name in ("vineppo_adaptive", "spo_chain"):
        assert result["strategies"][name]["compute"]["tokens_generated"] > 0, name
    assert result["strategies"]["spo_chain"]["options"] == {"k": 2, "cutpoint_interval": 1}
    if result["ranking"]["pairs_not_tied_in_truth"]:  # strategies with state_values rank; a group baseline scores chance
        assert result["strategies"]["spo_tree"]["ranking_accuracy"]["mean"] == 0.5
        assert result["strategies"]["spo_chain"]["ranking_accuracy"]["mean"] is not None

    # --critic once per learned strategy: prime's run from above, and a ppo run this audit trains; then both given
    again, both = tmp_path / "again", tmp_path / "both"
    small = ["--problems", 2, "--truth-samples", 4, "--alternatives", 2, *[x for b in sets for x in ("--set", b)]]
    assert _cli("audit", "--algos", "prime,ppo", "--critic", out / "critic-prime-1it", "--critic-iterations", 1,
                "--out", again, *small) == 0
    critics = json.loads((again / "audit.json").read_text())["critics"]
    assert not critics["prime"]["trained_here"] and critics["ppo"]["trained_here"]
    assert _cli("audit", "--algos", "prime,ppo", "--critic", out / "critic-prime-1it", "--critic", again / "critic-ppo-1it",
                "--critic-iterations", 0, "--out", both, *small) == 0
    critics = json.loads((both / "audit.json").read_text())["critics"]
    assert not critics["prime"]["trained_here"] and not critics["ppo"]["trained_here"]
