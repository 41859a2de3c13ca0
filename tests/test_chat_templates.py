"""Every checkpoint family is prompted exactly as its own chat template says:
prompt ids and the answer's closing ids equal transformers' apply_chat_template
on the same folder. The templates are the real ones (tests/chat_templates.py
names where each was read); the tokenizers are of each family's real kind,
with its real special tokens: Llama 2's sentencepiece vocabulary (../shared)
converted by transformers for the sentencepiece families, a tiny byte-level BPE
with Llama 3's / ChatML's special tokens for the others."""
import json
import shutil
from pathlib import Path

import pytest

import data
import eval as ev
from tests import chat_templates as T
from tests.tiny import tiny_config, tiny_tokenizer

transformers = pytest.importorskip("transformers")
LLAMA2_SP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "llama2_tokenizer.model"
needs_sp = pytest.mark.skipif(not LLAMA2_SP.is_file(), reason="../shared/data absent")
QUESTION, ANSWER = "How do I bake bread?", "Mix flour, water and yeast, then bake the dough."
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]


def _config(folder, vocab_size):
    (folder / "config.json").write_text(json.dumps(tiny_config(vocab_size=vocab_size)))
    return folder


def sp_family(folder, template, legacy=True, special=(), eos="</s>"):
    """Llama 2's vocabulary as transformers converts it (tokenizer.json), with
    the family's added special tokens and chat template."""
    folder.mkdir(parents=True)
    src = folder.parent / f".{folder.name}-src"
    src.mkdir()
    shutil.copy(LLAMA2_SP, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "bos_token": "<s>", "eos_token": eos,
        "unk_token": "<unk>", "add_bos_token": True}))
    tok = transformers.AutoTokenizer.from_pretrained(src)
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    if template:
        tok.chat_template = template
    tok.save_pretrained(folder)
    return _config(folder, len(tok))


def bpe_family(folder, template, special, bos, eos):
    """A tiny byte-level BPE (Llama 3 / Qwen kind) with the family's special tokens."""
    from tokenizers import Tokenizer

    n = tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(list(special))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "chat_template": template}))
    return _config(folder, n + len(special))


def reference(folder, messages, add_generation_prompt, template=None):
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    out = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                  chat_template=template)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def check_against_transformers(folder, template_file=None, system=None, documented=None):
    """Our prompt ids == transformers'; our prompt + answer ids == the start of
    transformers' ids of the whole conversation, up to and including the
    answer's end of turn (what follows it there is only the template's newline).
    documented: the prompt ids to expect instead, where transformers' own
    tokenisation differs (see the Llama 2 test)."""
    tok = data.load_tokenizer(folder, template=template_file, system=system)
    template = Path(template_file).read_text() if template_file else None
    conv = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": QUESTION}]
    prompt = data.encode_prompt(tok, QUESTION)
    ref_prompt = reference(folder, conv, True, template)
    assert prompt == (documented or ref_prompt)
    answer = data.encode_response(tok, QUESTION, ANSWER)
    whole = reference(folder, conv + [{"role": "assistant", "content": ANSWER}], False, template)
    assert answer == whole[len(ref_prompt):len(ref_prompt) + len(answer)]
    assert tok.decode(whole[len(prompt) + len(answer):], skip_special=False).strip() == ""
    assert answer[-1] == tok.end_of_turn_id and tok.end_of_turn_id in tok.stop_ids
    return tok, prompt, answer


def test_llama3_instruct(tmp_path):
    tok, prompt, answer = check_against_transformers(
        bpe_family(tmp_path / "m", T.LLAMA3, LLAMA3_SPECIAL, "<|begin_of_text|>", "<|eot_id|>"))
    assert prompt.count(tok.special["<|begin_of_text|>"]) == 1 and tok.decode(answer[-1:], False) == "<|eot_id|>"


def test_llama31_writes_its_system_header(tmp_path):
    folder = bpe_family(tmp_path / "m", T.LLAMA31, LLAMA3_SPECIAL, "<|begin_of_text|>", "<|eot_id|>")
    tok, prompt, _ = check_against_transformers(folder)
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024" in tok.decode(prompt, False)
    tok, prompt, _ = check_against_transformers(folder, system="You are terse.")
    assert "26 Jul 2024\n\nYou are terse.<|eot_id|>" in tok.decode(prompt, False)


def test_llama32_dates_its_prompt_with_strftime_now(tmp_path):
    import datetime

    tok, prompt, _ = check_against_transformers(
        bpe_family(tmp_path / "m", T.LLAMA32, LLAMA3_SPECIAL, "<|begin_of_text|>", "<|eot_id|>"))
    assert f"Today Date: {datetime.datetime.now().strftime('%d %b %Y')}\n\n" in tok.decode(prompt, False)


def test_qwen_style_chatml_keeps_its_escaped_default_system_message(tmp_path):
    tok, prompt, answer = check_against_transformers(
        bpe_family(tmp_path / "m", T.QWEN25, [], "<|im_start|>", "<|im_end|>"))
    assert tok.decode(prompt, False).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


@needs_sp
def test_tinyllama_zephyr(tmp_path):
    tok, prompt, answer = check_against_transformers(sp_family(tmp_path / "m", T.ZEPHYR, legacy=False))
    assert tok.decode(prompt, False).endswith("<|assistant|>\n") and answer[-1] == tok.eos_id


@needs_sp
def test_llama2_chat_keeps_the_space_before_eos(tmp_path):
    """Llama 2's tokenizer.json is legacy (a "▁" before every segment, as Meta's
    own code encodes "[INST] ..." after BOS). transformers 5 drops that "▁" after
    <s> in apply_chat_template, so the prompt is checked against sentencepiece's
    encoding of the prompt string Meta documents; the answer against transformers."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_SP))
    folder = sp_family(tmp_path / "m", T.LLAMA2_CHAT)
    tok, prompt, answer = check_against_transformers(
        folder, documented=[1] + sp.encode(f"[INST] {QUESTION} [/INST]"))
    assert prompt.count(tok.bos_id) == 1  # the template's BOS, no second one
    assert tok.decode(answer, False).endswith("dough. </s>") and answer[-2:] == [29871, 2]
    check_against_transformers(folder, system="Be brief.", documented=[1] + sp.encode(
        f"[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{QUESTION} [/INST]"))


@needs_sp
def test_mistral_v03_has_no_space_before_inst_close(tmp_path):
    tok, prompt, _ = check_against_transformers(
        sp_family(tmp_path / "m", T.MISTRAL_V03, legacy=False, special=["[INST]", "[/INST]"]))
    assert tok.decode(prompt, False).endswith("bread?[/INST]")


@needs_sp
def test_vicuna_ships_no_template_so_it_is_given_as_a_file(tmp_path):
    folder = sp_family(tmp_path / "m", None)
    assert data.load_tokenizer(folder).template == "alpaca"  # no template: the paper's default
    (tmp_path / "vicuna.jinja").write_text(T.VICUNA)
    tok, prompt, _ = check_against_transformers(folder, template_file=str(tmp_path / "vicuna.jinja"))
    assert tok.decode(prompt, False).endswith("USER: How do I bake bread?\nASSISTANT:")


@needs_sp
def test_sentencepiece_only_folder_matches_the_documented_llama2_prompt(tmp_path):
    """A folder with tokenizer.model alone (no tokenizer.json): transformers would
    convert it with its own legacy rules, so compare with sentencepiece's
    encoding of the prompt string Meta documents: <s>[INST] {prompt} [/INST]."""
    import sentencepiece as spm

    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(LLAMA2_SP, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": T.LLAMA2_CHAT, "bos_token": "<s>",
                                                              "eos_token": "</s>"}))
    tok = data.load_tokenizer(_config(folder, 32000))
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_SP))
    assert data.encode_prompt(tok, QUESTION) == [1] + sp.encode(f"[INST] {QUESTION} [/INST]")
    assert data.encode_response(tok, QUESTION, ANSWER)[-3:] == sp.encode("dough.")[-1:] + [29871, 2]


# ----------------------------------------------------------------------------
# Llama Guard: as a judge, and as a model someone tries to train


def _guard(tmp_path, template):
    return bpe_family(tmp_path / "g", template, LLAMA3_SPECIAL, "<|begin_of_text|>", "<|eot_id|>")


@pytest.mark.parametrize("name", ["LLAMA_GUARD_1", "LLAMA_GUARD_3_8B", "LLAMA_GUARD_3_PARTS"])
def test_llamaguard_judge_prompt_is_the_checkpoints_template(tmp_path, name):
    folder = _guard(tmp_path, getattr(T, name))
    tok = data.load_tokenizer(folder)
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    if name == "LLAMA_GUARD_3_PARTS":  # its template reads content as typed parts
        assert tok.content_parts
        conversation = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in conversation]
    ids = ev.llamaguard_ids(tok, 3, QUESTION, ANSWER)
    assert ids == reference(folder, conversation, False)
    assert f"User: {QUESTION}\n\nAgent: {ANSWER}\n\n<END CONVERSATION>" in tok.decode(ids, False)


@pytest.mark.parametrize("version, name", [(1, "LLAMA_GUARD_1"), (3, "LLAMA_GUARD_3_8B")])
def test_llamaguard_built_prompt_equals_the_official_template(tmp_path, version, name):
    """For a Llama Guard checkpoint without a chat template."""
    tok = data.load_tokenizer(_guard(tmp_path, getattr(T, name)))
    official = data.render_chat(tok, [{"role": "user", "content": QUESTION},
                                      {"role": "assistant", "content": ANSWER}], False)
    built = ev.llamaguard_prompt(QUESTION, ANSWER, version)
    assert official.split("<|begin_of_text|>")[-1] == built


def test_llamaguard_as_a_model_to_train(tmp_path):
    """Its prompt is its moderation prompt; an answer cannot follow it, and that is said."""
    folder = _guard(tmp_path, T.LLAMA_GUARD_3_PARTS)
    tok = data.load_tokenizer(folder)
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    assert data.encode_prompt(tok, QUESTION) == reference(folder, parts, True)
    with pytest.raises(ValueError, match=r"tokenizer_config.json: the chat template's render .* cannot be split"):
        data.encode_response(tok, QUESTION, ANSWER)


def test_a_template_that_raises_names_the_file(tmp_path):
    tok = data.load_tokenizer(_guard(tmp_path, T.LLAMA_GUARD_1), system="Be safe.")
    with pytest.raises(ValueError, match=r"g/tokenizer_config.json: the chat template refused .*"
                                         r"Conversation roles must alternate"):
        data.encode_prompt(tok, QUESTION)


# ----------------------------------------------------------------------------
# Choosing the template


def test_template_choice_and_errors(tmp_path):
    folder = bpe_family(tmp_path / "m", T.LLAMA3, LLAMA3_SPECIAL, "<|begin_of_text|>", "<|eot_id|>")
    assert data.load_tokenizer(folder).template == "chat"
    alpaca = data.load_tokenizer(folder, template="alpaca")
    assert data.render_prompt(alpaca, "Do X").endswith("### Instruction:\nDo X\n\n### Response:\n")
    assert data.render_prompt(data.load_tokenizer(folder, template="raw"), "Do X") == "Do X"
    assert data.render_prompt(data.load_tokenizer(folder, template="raw", system="S"), "Do X") == "S\n\nDo X"
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        data.load_tokenizer(folder, template="vicuna")
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_tokenizer(folder, template="missing.jinja")
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ValueError, match=r"bad.jinja: the chat template is not valid Jinja \(line 1"):
        data.load_tokenizer(folder, template=str(tmp_path / "bad.jinja"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="ships no chat template"):
        data.load_tokenizer(folder, template="chat")
    (folder / "chat_template.jinja").write_text(T.LLAMA3)  # newer checkpoints ship it as a file
    tok = data.load_tokenizer(folder)
    assert tok.template == "chat" and tok.template_source.endswith("chat_template.jinja")


def test_named_templates_list_picks_default(tmp_path):
    folder = bpe_family(tmp_path / "m", [{"name": "tool_use", "template": "{{ 'TOOLS' }}"},
                                         {"name": "default", "template": T.QWEN25}], [], "<|im_start|>", "<|im_end|>")
    assert data.encode_prompt(data.load_tokenizer(folder), QUESTION) == reference(
        folder, [{"role": "user", "content": QUESTION}], True, T.QWEN25)


def test_the_sandbox_refuses_unsafe_attribute_access(tmp_path):
    folder = bpe_family(tmp_path / "m", "{{ messages.__class__.__mro__ }}{{ messages[0]['content'] }}", [],
                        "<|im_start|>", "<|im_end|>")
    with pytest.raises(ValueError, match="the chat template refused"):
        data.load_tokenizer(folder)


# ----------------------------------------------------------------------------
# Scripts say and record which template they used


def test_a_run_records_its_template_and_ships_a_template_file(tmp_path, capsys):
    import eval as evaluation
    import sft
    from tests.tiny import tiny_ckpt, train_argv

    ckpt = tiny_ckpt(tmp_path / "base")
    (tmp_path / "zephyr.jinja").write_text(T.ZEPHYR)
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": "Sure! Here is how."}) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    sft.main(train_argv(ckpt, str(rows), out, "--max-steps", 2, "--template", tmp_path / "zephyr.jinja",
                        "--system", "Be brief."))
    assert f"prompt template: chat template of {tmp_path / 'zephyr.jinja'}; system message: 'Be brief.'" in \
        capsys.readouterr().out
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["prompt_template"] == {"template": "chat", "source": str(tmp_path / "zephyr.jinja"),
                                      "system": "Be brief."}
    assert (out / "chat_template.jinja").read_text() == T.ZEPHYR  # prompted later as it was trained
    tok = data.load_tokenizer(out)
    assert tok.template_source == str(out / "chat_template.jinja")
    assert data.render_prompt(tok, "Hi") == "<|user|>\nHi<|im_end|>\n<|assistant|>\n"
    res = evaluation.evaluate([str(out)], [str(rows)], max_new_tokens=2, limit=2, system="Be brief.",
                                 judge="refusal")
    assert res["settings"]["prompt_templates"][str(out)]["system"] == "Be brief."
