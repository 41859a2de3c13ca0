"""Tiny random checkpoints and tokenizers, made inside the tests (no downloads).

`tiny_ckpt(folder)` writes a complete Hugging Face-layout checkpoint: config.json,
model.safetensors, and a byte-level BPE tokenizer.json trained on a few
sentences, with ChatML special tokens — so every script can run on it.
"""
import json
from pathlib import Path

import torch

import model as model_lib

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "I can't help with that request, but here is a safer alternative.",
    "Sure! Here is how you do it: first, second, third.",
    "What is the capital of France? Paris is the capital of France.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: user assistant system 0123456789 A B",
]


def tiny_tokenizer(folder: Path, vocab_size: int = 300):
    """Train a byte-level BPE on CORPUS; ids 0-2 are the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "add_bos_token": False, "chat_template": CHATML}))
    return tok.get_vocab_size()


def tiny_config(**overrides) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": 256, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 2}
    cfg.update(overrides)
    return cfg


def random_model(seed: int = 0, **overrides) -> model_lib.Llama:
    torch.manual_seed(seed)
    m = model_lib.Llama(model_lib.LlamaConfig.from_dict(tiny_config(**overrides)))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones, so a norm bug shows
            else:
                p.normal_(0, 0.08)
    return m.eval()


def tiny_ckpt(folder, seed: int = 0, **overrides) -> Path:
    """A complete checkpoint folder: random weights + trained tiny tokenizer."""
    folder = Path(folder)
    tok_dir = folder.with_name(folder.name + "-tokenizer")
    tiny_tokenizer(tok_dir)
    m = random_model(seed, **overrides)
    model_lib.save_model(m, folder, tokenizer_dir=tok_dir)
    return folder


def train_argv(ckpt, data_file, out, *extra) -> list[str]:
    """sft.py / dpo.py arguments for a short, quiet, seeded run on a tiny checkpoint."""
    return ["--ckpt", str(ckpt), "--data", data_file, "--out", str(out), "--quiet", "--batch-size", "4",
            "--warmup-steps", "0", "--seed", "1", *map(str, extra)]
