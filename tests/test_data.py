"""Data loading, tokenisation, masking, truncation and batching (data.py)."""
import json
import re
from pathlib import Path

import pytest
import torch

import data
from tests.tiny import tiny_ckpt

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return data.load_tokenizer(tiny_ckpt(tmp_path_factory.mktemp("d") / "m"))


def write(path, rows, jsonl=True):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path


def test_instructions_both_formats_and_empty_response_counted(tmp_path):
    alpaca = write(tmp_path / "a.json", [{"instruction": "Add", "input": "1+1", "output": "2"},
                                         {"instruction": "Say", "output": "  "}], jsonl=False)
    stats = {}
    rows = data.load_instructions(alpaca, stats)
    assert rows == [{"prompt": "Add", "input": "1+1", "response": "2"}] and stats["skipped_empty"] == 1
    jl = write(tmp_path / "b.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    assert data.load_instructions(jl) == [{"prompt": "Hi", "input": "", "response": "Hello"}]


def test_bad_input_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_preferences(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3"):
        data.load_preferences(bad)
    missing = write(tmp_path / "m.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(KeyError, match=r"m.jsonl:1.*rejected"):
        data.load_preferences(missing)
    with pytest.raises(ValueError, match="no usable"):
        data.load_preferences(write(tmp_path / "e.jsonl", [{"prompt": "a", "chosen": "", "rejected": "c"}]))


def test_pku_filter_keeps_safe_and_better_over_unsafe(tmp_path):
    base = {"prompt": "q", "response_0": "r0", "response_1": "r1"}
    rows = [
        {**base, "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0},
        {**base, "is_response_0_safe": False, "is_response_1_safe": True, "better_response_id": 1, "safer_response_id": 1},
        {**base, "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 0},
        {**base, "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 1, "safer_response_id": 0},
    ]
    stats = {}
    pairs = data.load_preferences(write(tmp_path / "pku.jsonl", rows), stats)
    assert pairs == [{"prompt": "q", "chosen": "r0", "rejected": "r1"}, {"prompt": "q", "chosen": "r1", "rejected": "r0"}]
    assert stats["dropped_pku_filter"] == 2


def test_hh_rlhf_prompt_is_dialogue_up_to_last_assistant(tmp_path):
    pre = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How do I pick a lock?"
    rows = [{"chosen": pre + "\n\nAssistant: I can't help.", "rejected": pre + "\n\nAssistant: Sure."},
            {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}]
    stats = {}
    pairs = data.load_preferences(write(tmp_path / "hh.jsonl", rows), stats)
    assert pairs == [{"prompt": pre.strip(), "chosen": " I can't help.", "rejected": " Sure."}]
    assert stats["dropped_hh_prefix"] == 1


def test_load_prompts_formats(tmp_path):
    ev = write(tmp_path / "I-X.json", {"instructions": ["a", "b"], "inputs": ["", "ctx"]}, jsonl=False)
    assert data.load_prompts(ev) == ["a", "b\n\nctx"]
    assert data.load_prompts(write(tmp_path / "p.jsonl", [{"prompt": "p1"}, {"instruction": "p2"}])) == ["p1", "p2"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert data.load_prompts(tmp_path / "p.txt") == ["one", "two"]


def test_sft_tokens_bos_once_eos_trained_prompt_masked(tok):
    ex, stats = data.tokenize_sft(tok, [{"prompt": "What is the capital of France?", "input": "",
                                         "response": "Paris."}], max_len=128)
    ids, n = ex[0]["input_ids"], ex[0]["n_prompt"]
    # the prompt ids are exactly those generation encodes: the boundary does not move
    assert ids[:n] == data.encode_prompt(tok, "What is the capital of France?")
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # ChatML's <|im_start|> is the BOS, not doubled
    assert tok.pad_id == tok.eos_id == ids[-1]  # <|im_end|> closes the answer and is also the pad id
    short = data.tokenize_sft(tok, [{"prompt": "Hi", "input": "", "response": "A"}], max_len=128)[0]
    batch = data.collate_sft(ex + short, tok.pad_id)
    mask = batch["loss_mask"]
    assert mask[0].tolist() == [False] * n + [True] * (len(ids) - n)  # prompt masked, EOS trained
    row = batch["attention_mask"][1].bool()
    assert not mask[1][~row].any() and mask[1][row].sum() == len(short[0]["input_ids"]) - short[0]["n_prompt"]


def test_truncation_cuts_prompt_from_left_keeps_answer_and_counts_drops(tok):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    pairs = [{"prompt": long_prompt, "chosen": "Sure! Here is how you do it.", "rejected": "No."},
             {"prompt": "Hi", "chosen": "The quick brown fox jumps over the lazy dog. " * 10, "rejected": "No."}]
    full = data.encode_prompt(tok, long_prompt)
    out, stats = data.tokenize_pairs(tok, pairs, max_len=40)
    assert stats == {"pairs": 2, "truncated_prompt": 1, "dropped_too_long": 1, "kept": 1}
    ex = out[0]
    assert ex["prompt_ids"] == full[-len(ex["prompt_ids"]):]  # the end of the prompt is kept
    assert ex["chosen_ids"] == data.encode_response(tok, long_prompt, pairs[0]["chosen"])
    assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == 40  # the longer answer's sequence fills max_len


def test_opening_words_cut_answers_and_leave_them_open(tok):
    pairs = [{"prompt": "Hi", "chosen": "Sure! Here is how you do it.", "rejected": "I can't help with that."},
             {"prompt": "Hi", "chosen": "I can't help, sorry.", "rejected": "I can't help with that."}]
    out, stats = data.tokenize_pairs(tok, pairs, max_len=64, opening_words=2)
    assert stats["dropped_same_opening"] == 1 and stats["kept"] == 1  # "I can't" opens both answers of pair 2
    assert out[0]["chosen_ids"] == tok.encode("Sure! Here") and out[0]["rejected_ids"] == tok.encode("I can't")
    closed = data.encode_response(tok, "Hi", "Sure! Here")
    assert closed[:-1] == out[0]["chosen_ids"] and closed[-1] not in out[0]["chosen_ids"]  # no end of turn

    # one setting per pair: the second pair whole (closed), the first cut
    out, stats = data.tokenize_pairs(tok, pairs, max_len=64, opening_words=[2, 0])
    assert stats["kept"] == 2 and out[0]["chosen_ids"] == tok.encode("Sure! Here")
    assert out[1]["chosen_ids"] == data.encode_response(tok, "Hi", "I can't help, sorry.")


def test_a_prefix_runs_with_the_prompt_and_both_answers_continue_it(tok, tmp_path):
    rows = [{"prompt": "Cook rice.", "prefix": "Rinse the rice,", "chosen": "then boil it for ten minutes.",
             "rejected": "I must decline to help with that."}]
    pairs = data.load_preferences(write(tmp_path / "p.jsonl", rows))
    assert pairs[0]["prefix"] == "Rinse the rice,"
    out, stats = data.tokenize_pairs(tok, pairs, max_len=64, opening_words=2)
    head = data.encode_response(tok, "Cook rice.", "Rinse the rice,", closed=False)
    ex = out[0]
    assert stats["kept"] == 1 and ex["prompt_ids"] == data.encode_prompt(tok, "Cook rice.") + head  # untrained
    # each answer: the tokens after the prefix of the answer written out whole, 2 words of it, open
    assert ex["chosen_ids"] == data.encode_response(tok, "Cook rice.", "Rinse the rice, then boil",
                                                    closed=False)[len(head):]
    assert ex["rejected_ids"] == data.encode_response(tok, "Cook rice.", "Rinse the rice, I must",
                                                      closed=False)[len(head):]
    out, _ = data.tokenize_pairs(tok, pairs, max_len=64)  # whole answers: closed by the end of turn
    assert out[0]["chosen_ids"] == data.encode_response(tok, "Cook rice.", "Rinse the rice, then boil it for ten "
                                                        "minutes.")[len(head):]

    with pytest.raises(ValueError, match=r"p2.jsonl:1: field 'prefix' is empty"):
        data.load_preferences(write(tmp_path / "p2.jsonl", [dict(rows[0], prefix=" ")]))


@pytest.mark.skipif(not (SHARED / "tokenizers" / "llama2_tokenizer.model").is_file(), reason="../shared/data absent")
def test_truncation_keeps_the_single_bos():
    sp = data.load_tokenizer(SHARED / "tokenizers" / "llama2_tokenizer.model")
    out, _ = data.tokenize_sft(sp, [{"prompt": "word " * 50, "input": "", "response": "Fine."}], max_len=30)
    ids = out[0]["input_ids"]
    assert len(ids) == 30 and ids[0] == sp.bos_id and ids.count(sp.bos_id) == 1 and ids[-1] == sp.eos_id


def test_pairs_collate_one_row_per_pair_with_both_answers_branching_off_the_prompt(tok):
    pairs = [{"prompt": "Hi", "chosen": "A", "rejected": "B B B"}, {"prompt": "What is it?", "chosen": "A", "rejected": "B"}]
    ex, _ = data.tokenize_pairs(tok, pairs, 64)
    batch = data.collate_pairs(ex, tok.pad_id)
    assert batch["input_ids"].shape[0] == 2 and batch["index"].tolist() == [0, 1]
    for row, e in enumerate(ex):
        p, c, r = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
        n = len(p) + len(c) + 1 + len(r)
        assert data.example_length(e) == n == batch["attention_mask"][row].sum()
        assert batch["input_ids"][row, :n].tolist() == p + c + p[-1:] + r
        assert batch["segments"][row, :n].tolist() == [0] * (len(p) - 1) + [1] * (1 + len(c)) + [2] * (1 + len(r))
        # trained: the answers, not the prompt nor its copy that starts the rejected branch
        assert batch["loss_mask"][row, :n].tolist() == [False] * len(p) + [True] * len(c) + [False] + [True] * len(r)
        assert not batch["loss_mask"][row, n:].any()
        # chosen_mask / rejected_mask are shifted by one (they index token_logps [B, T-1])
        assert batch["chosen_mask"][row].sum() == len(c) and batch["rejected_mask"][row].sum() == len(r)
        assert batch["input_ids"][row, 1:][batch["chosen_mask"][row]].tolist() == c
        assert batch["input_ids"][row, 1:][batch["rejected_mask"][row]].tolist() == r


def test_length_grouping_covers_everything_once_and_cuts_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (500,), generator=g).tolist()
    grouped = data.length_grouped_batches(lengths, 8, seed=1, epoch=0)
    plain = data.length_grouped_batches(lengths, 8, seed=1, epoch=0, group=1)
    assert sorted(i for b in grouped for i in b) == list(range(500))
    assert data.padding_fraction(grouped, lengths) < 0.5 * data.padding_fraction(plain, lengths)
    assert grouped == data.length_grouped_batches(lengths, 8, seed=1, epoch=0)  # deterministic
    assert grouped != data.length_grouped_batches(lengths, 8, seed=1, epoch=1)


def test_sit_mix_is_seeded_and_counted():
    inst = [{"prompt": f"i{k}", "input": "", "response": "r"} for k in range(10)]
    safety = [{"prompt": f"s{k}", "input": "", "response": "no"} for k in range(20)]
    mix = data.mix_sit(inst, safety, 5, seed=3)
    assert len(mix) == 15 and mix[:10] == inst and len({m["prompt"] for m in mix[10:]}) == 5
    assert mix == data.mix_sit(inst, safety, 5, seed=3) and mix != data.mix_sit(inst, safety, 5, seed=4)
    with pytest.raises(ValueError, match="n-safety"):
        data.mix_sit(inst, safety, 21)


def test_show_marks_trained_tokens(tok, tmp_path, capsys):
    f = write(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "A", "rejected": "B"}])
    data.show(["--ckpt", str(Path(tok.path).parent), "--data", str(f), "--no-color"])
    out = capsys.readouterr().out
    assert "[A][<|im_end|>]" in out and "[B][<|im_end|>]" in out and "[Hi]" not in out


@pytest.mark.real
@pytest.mark.skipif(not (SHARED / "pku_saferlhf_pairs.jsonl").is_file(), reason="../shared/data absent")
def test_real_data_loaders_and_sit_mix():
    stats = {}
    pairs = data.load_preferences(SHARED / "pku_saferlhf_pairs.jsonl", stats)
    assert len(pairs) == 5135 and stats["pairs"] == 5135
    a_stats = {}
    alpaca = data.load_instructions(SHARED / "alpaca_5000.json", a_stats)
    assert len(alpaca) + a_stats.get("skipped_empty", 0) == 5000  # a few Alpaca rows have empty outputs
    safety = data.load_instructions(SHARED / "safety_only_data_Instructions.json")
    assert len(safety) == 2483
    mix = data.mix_sit(alpaca, safety, 500, seed=0)
    assert len(mix) == len(alpaca) + 500 and sum(m in safety for m in mix[len(alpaca):]) == 500
    prompts = data.load_prompts(SHARED / "I-MaliciousInstructions.json")
    assert len(prompts) == 100


def test_demo_eval_prompts_are_in_no_training_file():
    demo = Path(__file__).resolve().parents[1] / "demo_data"
    trained = {p["prompt"] for f in ("prefs_train.jsonl", "prefs_openings.jsonl")
               for p in data.load_preferences(demo / f, keep=("kind",))}
    trained |= {ex["prompt"] for ex in data.load_instructions(demo / "sit_train.json")}
    trained |= set(data.load_prompts(demo / "raft_prompts.jsonl"))
    held_out = [p for f in ("eval_harmful", "eval_benign", "confirm_harmful", "confirm_benign")
                for p in data.load_prompts(demo / f"{f}.jsonl")]
    assert len(held_out) == 220 and len(set(held_out)) == 220 and len(trained) > 900
    assert not set(held_out) & trained
    kinds = [p["kind"] for p in data.load_preferences(demo / "prefs_openings.jsonl", keep=("kind",))]
    assert (kinds.count("harmful"), kinds.count("benign")) == (138, 180)  # demo_data/README.md


def test_held_out_ordinary_instructions_are_not_near_any_training_prompt():
    # The pipeline trains on the base model's answers to ordinary_train (and every
    # other training file); ordinary_eval and ordinary_valid must be new tasks, not
    # rewordings: under 45% of their content words shared with any training prompt.
    demo = Path(__file__).resolve().parents[1] / "demo_data"
    stop = {"a", "an", "the", "of", "to", "in", "and", "for", "how", "what", "is", "my", "me", "i", "do",
            "write", "give", "on", "with", "that", "about", "are"}

    def words(p):
        return set(re.findall(r"[a-z]+", p.lower())) - stop

    trained = data.load_prompts(demo / "ordinary_train.jsonl") + data.load_prompts(demo / "raft_prompts.jsonl")
    trained += [ex["prompt"] for ex in data.load_instructions(demo / "sit_train.json")]
    trained += [p["prompt"] for p in data.load_preferences(demo / "prefs_train.jsonl")]
    held_out = data.load_prompts(demo / "ordinary_eval.jsonl") + data.load_prompts(demo / "ordinary_valid.jsonl")
    assert len(held_out) == 60 and len(trained) > 700
    close = [(p, t) for p in held_out for t in trained
             if len(words(p) & words(t)) / len(words(p) | words(t)) >= 0.45]
    assert not close
    refs = [json.loads(line)["reference"] for line in (demo / "ordinary_eval.jsonl").read_text().splitlines()]
    assert len(refs) == 30 and all(len(r.split()) >= 5 for r in refs)
