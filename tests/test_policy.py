"""The policy room: char tokenizer, save/load of any causal LM, the cached pretrain of the built-in default."""

import dataclasses
import os

import gin
import pytest
import torch

from rlzoo.errors import UserError
from rlzoo.policy import (
    PRESETS,
    PretrainConfig,
    build_char_tokenizer,
    build_model,
    describe_policy,
    _sft_data,
    load_policy,
    policy_folder,
    pretrain,
    pretrain_config,
)
from rlzoo.tasks import get_task


def test_char_tokenizer_round_trip_is_exact(tmp_path):
    from transformers import AutoTokenizer

    task = get_task("arith")
    tokenizer = build_char_tokenizer(task.alphabet)
    problems = task.problems("test")[:20]
    texts = [task.alphabet, "\n\n" + task.alphabet[::-1] + "\n"]
    texts += [task.prompt(p) + task.target(p) for p in problems]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # BOS, then one token per character
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert reloaded(text)["input_ids"] == ids
        assert reloaded.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == len(set(task.alphabet)) + 4
    assert tokenizer("\u00e9")["input_ids"][1] == tokenizer.unk_token_id  # outside the alphabet


def test_saved_policy_reloads_with_identical_logits(tmp_path):
    tokenizer = build_char_tokenizer(get_task("arith").alphabet)
    model = build_model(PretrainConfig(), tokenizer).eval()  # the default architecture, random weights
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    loaded, loaded_tokenizer = load_policy(str(tmp_path))
    assert loaded_tokenizer.padding_side == "left" and loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    batch = loaded_tokenizer(["12+3?\n", "7*8-1?\n"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
        actual = loaded(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    half, _ = load_policy(str(tmp_path), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16 and next(loaded.parameters()).dtype == torch.float32


def test_pretrain_is_cached_by_config(tmp_path):
    cfg = PretrainConfig(**{**PRESETS["tiny"], "steps": 3, "warmup_steps": 1})
    folder = pretrain(cfg, home=tmp_path, progress=False)
    weights = folder / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert describe_policy(folder)["config"] == dataclasses.asdict(cfg)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary build folder left behind

    assert pretrain(cfg, home=tmp_path, progress=False) == folder
    assert weights.stat().st_mtime_ns == built_at  # found in the cache, not retrained

    other = pretrain(dataclasses.replace(cfg, seed=1), home=tmp_path, progress=False)
    assert other != folder and (other / "pretrain.json").is_file()

    rebuilt = pretrain(cfg, home=tmp_path, force=True, progress=False)
    assert rebuilt == folder and weights.stat().st_mtime_ns != built_at
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, other.name])


@pytest.mark.parametrize("preset, knobs", [("default", {}), ("tiny", {}), ("tiny", {"train_size": 300}),
                                          ("tiny", {"train_size": 100}), ("tiny", {"seed": 5})])
def test_policy_folder_names_the_policy_that_pretrain_builds_without_drawing_the_whole_pool(tmp_path, preset, knobs):
    cfg = pretrain_config(preset)
    cfg = dataclasses.replace(cfg, task_kwargs={**cfg.task_kwargs, **knobs})
    assert policy_folder(cfg, tmp_path) == _sft_data(cfg, tmp_path)[2]  # what pretrain names its build
    if knobs.get("seed"):  # other problems, another policy
        assert policy_folder(cfg, tmp_path) != policy_folder(pretrain_config(preset), tmp_path)


def test_pretrain_config_layers_preset_gin_and_overrides():
    try:
        gin.parse_config(["pretrain.steps = 7"])
        cfg = pretrain_config("tiny", seed=3)
        assert cfg.steps == 7 and cfg.seed == 3 and cfg.hidden_size == PRESETS["tiny"]["hidden_size"]
    finally:
        gin.clear_config()
    with pytest.raises(UserError, match="unknown pretrain preset"):
        pretrain_config("huge")


def test_load_policy_default_uses_the_gin_config(tiny_policy_path):
    """`default` is whatever pretrain.* configures: bound to the tiny preset, it is the tiny policy (cached)."""
    from rlzoo.config import apply_gin

    bindings = [f"pretrain.{k} = {v!r}" for k, v in PRESETS["tiny"].items()]
    try:
        apply_gin([], bindings)
        model, tokenizer = load_policy("default")
    finally:
        gin.clear_config()
    expected, _ = load_policy(str(tiny_policy_path))
    torch.testing.assert_close(model.model.embed_tokens.weight, expected.model.embed_tokens.weight)


@pytest.mark.parametrize(
    "name, message",
    [
        ("./no/such/model", "does not exist"),
        ("/definitely/not/here", "does not exist"),
        ("no-such-org/no-such-model", "cannot load model"),  # offline in tests (HF_HUB_OFFLINE)
    ],
)
def test_load_policy_errors_are_one_line(name, message):
    with pytest.raises(UserError, match=message) as info:
        load_policy(name)
    assert "\n" not in str(info.value)


def test_load_policy_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_policy(str(tmp_path))
    assert os.listdir(tmp_path) == []
    (tmp_path / "config.json").write_text("{}")  # no model_type: transformers cannot tell what it is
    with pytest.raises(UserError, match="cannot load model folder") as info:
        load_policy(str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="unknown dtype"):
        load_policy(str(tmp_path), dtype="float99")


def _save_tiny(folder, arch: str, tokenizer, dropout: float = 0.0):
    """A tiny random GPT-2 or Llama beside ``tokenizer``, saved as a user's checkpoint would be."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tokenizer),
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        model = GPT2LMHeadModel(config)
    else:  # Llama drops out inside the attention kernel, from a float it copied from its config
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, max_position_embeddings=128, vocab_size=len(tokenizer),
                             attention_dropout=dropout)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dropout_is_off_in_the_policy_its_reference_and_the_critic_so_the_first_ratio_is_exactly_1(tmp_path, arch):
    import copy

    from transformers import AutoModelForCausalLM

    from rlzoo.algorithms.value_ppo import ValueModel
    from rlzoo.ppo import batched_logprobs, forward_logprobs

    tokenizer = build_char_tokenizer(get_task("arith").alphabet)
    folder = str(_save_tiny(tmp_path, arch, tokenizer, dropout=0.5))
    batch = tokenizer(["12+3=15\n", "7*8-1=55\n", "9?"], padding=True, return_tensors="pt")
    ids, attn = batch["input_ids"], batch["attention_mask"]

    raw = AutoModelForCausalLM.from_pretrained(folder).train()  # the checkpoint does drop out, as loaded by hand
    with torch.no_grad():
        assert not torch.equal(raw(input_ids=ids, attention_mask=attn).logits, raw.eval()(input_ids=ids, attention_mask=attn).logits)

    policy, _ = load_policy(folder)
    reference = copy.deepcopy(policy).eval()  # as train.py makes it
    old = batched_logprobs(policy, ids, attn, temperature=0.6, micro_batch_size=8)  # eval mode, as at rollout time
    new, _ = forward_logprobs(policy.train(), ids, attn, 0.6)  # train mode, as in ppo_update
    assert torch.equal(torch.exp(new.detach() - old), torch.ones_like(old))  # PPO's first ratio
    assert torch.equal(batched_logprobs(reference.train(), ids, attn, 0.6, 8), old)
    critic = ValueModel(folder)
    torch.nn.init.normal_(critic.head.weight)  # its zero-initialised head would value every state 0, dropout or not
    with torch.no_grad():
        assert torch.equal(critic.train()(ids, attn), critic.eval()(ids, attn))
    policy.save_pretrained(tmp_path / "saved")  # a checkpoint of the run reloads without dropout, even by hand
    resaved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").train()
    with torch.no_grad():
        assert torch.equal(resaved(input_ids=ids, attention_mask=attn).logits, policy(input_ids=ids, attention_mask=attn).logits)


def test_a_tokenizer_with_neither_pad_nor_eos_is_one_line_and_exit_2(tmp_path, capsys):
    from rlzoo.cli import main

    tokenizer = build_char_tokenizer(get_task("arith").alphabet)
    tokenizer.pad_token = tokenizer.eos_token = None  # rollout batches would have nothing to pad with
    folder = str(_save_tiny(tmp_path / "model", "llama", tokenizer))
    with pytest.raises(UserError, match="neither a pad nor an EOS token") as info:
        load_policy(folder)
    assert "\n" not in str(info.value)
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", folder, "--limit", "2", "--samples", "1", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "neither a pad nor an EOS token" in err
    assert not out.exists()
