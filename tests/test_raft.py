"""raft.py: degenerate filters, local/global ranking, rewards, and whole iterations on a tiny model."""
import json
import math
import re
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

import data
import eval as eval_lib
import generation
import model as model_lib
import raft
from tests.tiny import CHATML, CORPUS, SPECIAL, random_model

PROMPTS = "demo_data/raft_prompts.jsonl"


def word_ckpt(folder, seed=0):
    """A tiny random model over a word-level vocabulary (the words of CORPUS).
    Every token decodes to clean text that encodes back to the same words, so
    kept answers reach sft.py unchanged (random byte-level tokens would decode
    to U+FFFD and be re-encoded as other tokens)."""
    words = sorted({w for line in CORPUS for w in re.findall(r"\w+|[^\w\s]", line)})
    vocab = {t: i for i, t in enumerate(SPECIAL + ["[UNK]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIAL])
    tok_dir = folder.with_name(folder.name + "-tokenizer")
    tok_dir.mkdir(parents=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "add_bos_token": False, "chat_template": CHATML}))
    return model_lib.save_model(random_model(seed, vocab_size=len(vocab)), folder, tokenizer_dir=tok_dir)


def sampling_args(*argv):
    """The Namespace sample_and_select reads, filled by raft.py's own parser."""
    return raft.build_parser().parse_args(["--prompts", PROMPTS, "--reward", "count:fox", "--out", "unused",
                                           "--quiet", *argv])


def test_degenerate_reasons():
    ok = {"ids": list(range(20)), "text": "A fine answer.", "finished": True}
    assert raft.degenerate_reason(ok, drop_truncated=True) is None
    assert raft.degenerate_reason(dict(ok, text="  \n"), False) == "empty"
    loop = dict(ok, ids=[5, 6, 7, 8] * 6)  # 21 4-grams, only 4 distinct
    assert raft.repeat_share(loop["ids"]) == pytest.approx(1 - 4 / 21)
    assert raft.degenerate_reason(loop, False) == "repetitive"
    assert raft.degenerate_reason(dict(loop, ids=[5, 6, 7, 8] * 3), False) is None  # too short to judge
    cut = dict(ok, finished=False)
    assert raft.degenerate_reason(cut, drop_truncated=False) is None
    assert raft.degenerate_reason(cut, drop_truncated=True) == "truncated"


def test_distinct_2():
    assert raft.distinct_n(["a b c", "a b d"]) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert raft.distinct_n(["a", ""]) == 0.0


def test_ranking_with_a_token_reward_is_argmax_and_top_fraction():
    reward = raft.make_reward("count:fox")
    answers = [["no", "fox", "fox fox", "fox"],  # best is sample 2
               ["fox", "no", "fox", "no"],  # tie between 0 and 2: lowest index
               ["fox fox fox", "no", "no", "no"]]  # best (3) would be sample 0, but it is degenerate below
    scores = [reward(["p"] * 4, row) for row in answers]
    assert scores[0] == [0.0, 1.0, 2.0, 1.0]
    ok = [[True] * 4, [True] * 4, [False, True, True, True]]
    assert raft.select_local(scores, ok) == [(0, 2), (1, 0), (2, 1)]  # row 2: all-zero tie -> first allowed
    assert raft.select_local(scores, [[True] * 4, [True] * 4, [False] * 4]) == [(0, 2), (1, 0)]
    # global: 11 allowed samples, frac 1/4 -> top 3: (0,2)=2, then the 1.0 ties in (i, j) order: (0,1), (0,3)
    assert raft.select_global(scores, ok, 0.25) == [(0, 1), (0, 2), (0, 3)]
    assert raft.select_global(scores, ok, 0.4) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2)]
    with pytest.raises(ValueError, match="keep-frac"):
        raft.select_global(scores, ok, 0.0)


def test_sampled_iteration_keeps_exactly_the_argmax(tmp_path):
    """On real samples from a tiny model: the kept flags are the per-prompt argmax
    (local) or the global top 1/K (global) of rewards recomputed here."""
    ckpt = word_ckpt(tmp_path / "lm", seed=3)
    policy, tok = model_lib.load_model(ckpt), data.load_tokenizer(ckpt)
    prompts = data.load_prompts(PROMPTS)[:6]
    for rank in ("local", "global"):
        args = sampling_args("--k", "4", "--max-new-tokens", "12", "--temperature", "1.0", "--top-p", "1.0",
                             "--rank", rank)
        records, kept, stats = raft.sample_and_select(policy, tok, prompts, raft.make_reward("count:fox"), args, 7)
        assert [r["prompt"] for r in records] == prompts and all(len(r["answers"]) == 4 for r in records)
        scores = [[float(a.count("fox")) for a in r["answers"]] for r in records]
        assert [r["scores"] for r in records] == scores
        assert any(s > 0 for row in scores for s in row)  # the reward is not flat on these samples
        flags = [(i, j) for i, r in enumerate(records) for j, k in enumerate(r["kept"]) if k]
        allowed = [[d is None for d in r["dropped"]] for r in records]
        if rank == "local":
            want = [(i, max((j for j in range(4) if allowed[i][j]), key=lambda j: (row[j], -j)))
                    for i, row in enumerate(scores) if any(allowed[i])]
        else:
            cands = sorted(((-scores[i][j], i, j) for i in range(6) for j in range(4) if allowed[i][j]))
            want = sorted((i, j) for _, i, j in cands[:math.ceil(len(cands) / 4)])
        assert flags == want
        assert [k["response"] for k in kept] == [records[i]["answers"][j] for i, j in want]
        assert stats["kept"] == len(want) and stats["samples"] == 24


def test_refusal_reward_is_evals_judge():
    answers = ["I'm sorry, but I can't help with that.", "Sure! Step one: buy a crowbar.", ""]
    assert raft.make_reward("refusal")(["q"] * 3, answers) == [float(eval_lib.is_refusal(a)) for a in answers]
    assert raft.make_reward("refusal")(["q"] * 2, answers[:2]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a folder"):
        raft.make_reward("no/such/dir")


def test_iteration_prompts_wrap_around():
    assert raft.iteration_prompts(list("abcde"), 1, 3) == list("abc")
    assert raft.iteration_prompts(list("abcde"), 2, 3) == list("dea")


def test_one_iteration_raises_fresh_reward_and_resume_skips_it(tmp_path):
    ckpt = word_ckpt(tmp_path / "lm", seed=2)
    tok = data.load_tokenizer(ckpt)
    prompts = data.load_prompts(PROMPTS)[:16]

    def fresh_reward(folder):  # other prompts' order and another seed than the RAFT sampling
        out = generation.generate(model_lib.load_model(folder), tok, prompts, max_new_tokens=16, temperature=1.0,
                                  num_samples=8, seed=123, batch_size=64)
        return sum(s["text"].count("fox") for row in out for s in row) / (16 * 8)

    argv = ["--ckpt", str(ckpt), "--prompts", PROMPTS, "--reward", "count:fox", "--out", str(tmp_path / "raft"),
            "--prompts-per-iter", "16", "--k", "8", "--max-new-tokens", "16", "--temperature", "1.0",
            "--top-p", "1.0", "--sft-lr", "3e-3", "--sft-epochs", "3", "--sft-batch-size", "4", "--quiet",
            "--sft-log-every", "0"]
    last = raft.main(argv)
    before, after = fresh_reward(ckpt), fresh_reward(last)
    assert after > before + 0.1, (before, after)

    it1 = tmp_path / "raft" / "iter_1"
    records = [json.loads(line) for line in (it1 / "samples.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in (it1 / "kept.jsonl").read_text().splitlines()]
    assert len(records) == 16 and len(kept) == sum(sum(r["kept"]) for r in records) == 16
    log = [json.loads(line) for line in (tmp_path / "raft" / "raft_log.jsonl").read_text().splitlines()]
    assert log[0]["iteration"] == 1 and log[0]["reward/kept"]["mean"] > log[0]["reward/all"]["mean"]
    assert (it1 / "config.json").is_file() and (it1 / "model.safetensors").is_file()

    with pytest.raises(FileExistsError, match="--resume"):
        raft.main(argv)
    stamp = (it1 / "samples.jsonl").stat().st_mtime_ns
    small = ["--iterations", "2", "--prompts-per-iter", "4", "--k", "2", "--sft-max-steps", "1", "--resume"]
    last = raft.main(argv + small)  # later flags win: a small second iteration
    assert last == str(tmp_path / "raft" / "iter_2")
    assert (it1 / "samples.jsonl").stat().st_mtime_ns == stamp  # iteration 1 was not redone
    log = [json.loads(line) for line in (tmp_path / "raft" / "raft_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2]
    second = [json.loads(line) for line in (tmp_path / "raft" / "iter_2" / "samples.jsonl").read_text().splitlines()]
    # iteration 2 with 4 prompts per iteration: the shuffled list's slots 4..7, which iteration 1 also had
    assert [r["prompt"] for r in second] == [r["prompt"] for r in records[4:8]]


def test_a_kill_after_an_iterations_sft_loses_no_log_line_and_no_folder_stays(tmp_path, monkeypatch):
    """Killed after iteration 1's sft.py finished, before raft_log.jsonl was
    written, with a half-written final folder of a killed save beside it: the
    resumed run skips iteration 1, keeps its log line, leaves no .final* folder."""
    ckpt = word_ckpt(tmp_path / "lm", seed=2)
    out = tmp_path / "raft"
    argv = ["--ckpt", str(ckpt), "--prompts", PROMPTS, "--reward", "count:fox", "--out", str(out),
            "--prompts-per-iter", "4", "--k", "2", "--max-new-tokens", "8", "--sft-max-steps", "1",
            "--sft-batch-size", "2", "--quiet", "--sft-log-every", "0", "--iterations", "2"]
    real_write = raft.write_jsonl

    def killed(path, rows):
        if Path(path).name == "raft_log.jsonl":
            raise KeyboardInterrupt("kill -9")
        real_write(path, rows)

    monkeypatch.setattr(raft, "write_jsonl", killed)
    with pytest.raises(KeyboardInterrupt):
        raft.main(argv)
    monkeypatch.setattr(raft, "write_jsonl", real_write)
    assert (out / "iter_1" / "config.json").is_file() and not (out / "raft_log.jsonl").exists()
    (out / ".iter_2.final").mkdir()  # what a save killed mid-way leaves
    (out / ".iter_2.final" / "model.safetensors").write_bytes(b"torn")
    raft.main(argv + ["--resume"])
    log = [json.loads(line) for line in (out / "raft_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2] and log[0]["sft_seconds"] is not None
    assert not list(out.glob(".*final*"))
