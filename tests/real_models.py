"""Small real-tokenizer models, built in seconds inside the test suite: what a user brings from the hub,
in miniature. Byte-level BPE vocabularies trained with ``tokenizers`` on the packaged GSM8K text, one
with merges across newlines (as Llama-3 / Qwen2 vocabularies have: ``.\\n``, ``:\\n`` are tokens) and one
split by GPT-2's regex; a tiny Llama and a tiny GPT-2 (with dropout, as GPT-2 checkpoints have) over them."""

from pathlib import Path

from rlzoo.tasks import get_task

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]


def bpe_tokenizer(newline_merges: bool, vocab_size: int = 2000, problems: int = 1500):
    """A PreTrainedTokenizerFast trained on the prompts and SFT targets of the first ``problems`` GSM8K train
    problems. ``newline_merges``: no pre-tokenizer split at all, so merges span newlines and punctuation
    (``?\\n\\nSolution:``); else GPT-2's regex split. BOS is prepended, as Llama's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    task = get_task("gsm8k")
    texts = [task.prompt(p) + task.target(p) for p in task.problems("train")[:problems]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not newline_merges)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    bos = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                           special_tokens=[("<|bos|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", padding_side="left", clean_up_tokenization_spaces=False)


def save_model(folder: Path, arch: str, tokenizer, context: int, dropout: float = 0.0, seed: int = 0) -> str:
    """A tiny random ``arch`` ("llama" or "gpt2") of ``context`` positions over ``tokenizer``, saved with it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=context, vocab_size=len(tokenizer),
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **ids)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, max_position_embeddings=context, vocab_size=len(tokenizer),
                             attention_dropout=dropout, tie_word_embeddings=True, **ids)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
