"""Tokenizers (both kinds) and prompt templates."""
from pathlib import Path

import pytest

import data
from tests.tiny import tiny_ckpt

LLAMA2_SP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "llama2_tokenizer.model"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return data.load_tokenizer(tiny_ckpt(tmp_path_factory.mktemp("t") / "m"))


@pytest.mark.skipif(not LLAMA2_SP.is_file(), reason="../shared/data absent")
def test_sentencepiece_llama2():
    tok = data.load_tokenizer(LLAMA2_SP)
    assert tok.encode("Hello world!") == [15043, 3186, 29991]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.template == "alpaca" and tok.add_bos  # no chat template: the paper's Alpaca prompt
    ids = data.encode_prompt(tok, "Say hi")
    assert ids[0] == 1 and ids.count(1) == 1  # BOS exactly once
    assert tok.decode(ids).endswith("### Instruction:\nSay hi\n\n### Response:\n")
    resp = data.encode_response(tok, "Say hi", "Hi!")
    assert resp[-1] == 2 and tok.decode(resp) == "Hi!"
    # the answer's first piece is "Hi" with no "▁": after "Response:\n" it is encoded as in the whole text
    assert resp[:-1] == tok.encode(data.render_prompt(tok, "Say hi") + "Hi!")[len(tok.encode(
        data.render_prompt(tok, "Say hi"))):]
    assert tok.encode("<s>Hello") == [1, 15043]  # special-token text becomes its id


def test_bpe_special_tokens_and_chatml(bpe):
    assert bpe.encode("<|im_start|>") == [1] and bpe.encode("<|im_end|>") == [2]
    assert bpe.template == "chat" and not bpe.add_bos
    ids = data.encode_prompt(bpe, "What is the capital of France?")
    assert ids[0] == 1 and bpe.decode(ids, skip_special=False).endswith("<|im_start|>assistant\n")
    resp = data.encode_response(bpe, "What is the capital of France?", "Paris.")
    assert resp[-1] == 2 and 2 in bpe.stop_ids  # <|im_end|> closes the answer and stops generation
    assert bpe.decode(ids + resp) == "user\nWhat is the capital of France?\nassistant\nParis."


def test_builtin_templates_render_as_documented(tmp_path):
    tok = data.load_tokenizer(tiny_ckpt(tmp_path / "m"), template="alpaca")
    assert data.render_prompt(tok, "Do X") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X\n\n### Response:\n")
    assert "### Input:\nctx\n\n### Response:\n" in data.render_prompt(tok, "Do X", "ctx")
    assert data.render_prompt(data.load_tokenizer(tmp_path / "m", template="alpaca", system="Be kind."),
                              "Do X").startswith("Be kind.\n\n### Instruction:")
    assert data.render_prompt(data.load_tokenizer(tmp_path / "m", template="raw"), "Do X") == "Do X"


def test_prompt_and_response_are_encoded_separately(bpe):
    """The prompt ids used for training are those generate() feeds the model."""
    p, r = data.encode_prompt(bpe, "Hi"), data.encode_response(bpe, "Hi", "Sure! Here is how")
    assert p == data.encode_prompt(bpe, "Hi") and (p + r)[:len(p)] == p
    assert r[:-1] == bpe.encode("Sure! Here is how")
