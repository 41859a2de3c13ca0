"""mcq.py: harness-style multiple-choice scoring, against a plain loop."""
import json

import pytest
import torch

import data
import mcq
import model as model_lib
from tests.tiny import tiny_ckpt

ITEMS = [{"question": "What is the capital of France?", "choices": ["Paris", "A quick brown fox"], "answer": 0},
         {"question": "Pick one ", "choices": ["A", "B", "The lazy dog"], "answer": 2},  # a trailing space
         {"question": "Sure", "choices": ["first", "second"], "answer": 1}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_ckpt(tmp_path_factory.mktemp("mcq") / "ckpt", seed=4)


def test_context_and_continuation_split_as_the_harness_splits_them(ckpt):
    tok = data.load_tokenizer(ckpt)
    context, conts = mcq.encode_choices(tok, "Question: Pick one \nAnswer: ", ["A", "The lazy dog"])
    assert context == tok.encode("Question: Pick one \nAnswer:")  # the trailing space moves to the choice
    for c, ids in zip(["A", "The lazy dog"], conts):
        assert context + ids == tok.encode("Question: Pick one \nAnswer:" + "  " + c)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_choice_logps_are_each_continuation_scored_alone(ckpt, batch_size):
    """One row per question with the choices as branches gives what each
    context + continuation gives run alone (batches cut across questions)."""
    m, tok = model_lib.load_model(ckpt, device="cpu"), data.load_tokenizer(ckpt)
    got = mcq.choice_logps(m, tok, ITEMS, "piqa", batch_size=batch_size)
    for it, per in zip(ITEMS, got):
        context, conts = mcq.encode_choices(tok, mcq.PROMPTS["piqa"](it["question"]), it["choices"])
        assert len(per) == len(it["choices"])
        for c, total in zip(conts, per):
            with torch.no_grad():
                logp = m(torch.tensor([context + c])).log_softmax(-1)[0]  # [T, V]
            want = sum(logp[len(context) + j - 1, c[j]].item() for j in range(len(c)))
            assert total == pytest.approx(want, abs=1e-4)


def test_acc_and_acc_norm():
    items = [{"choices": ["a", "bbbb"], "answer": 1}, {"choices": ["cc", "d"], "answer": 0}]
    lls = [[-1.0, -2.0], [-3.0, -2.0]]  # summed: picks 0 and 1 (both wrong)
    res = mcq.accuracy(items, lls)  # per character: -1 vs -0.5 (right), -1.5 vs -2 (right)
    assert (res["acc"], res["acc_norm"]) == (0.0, 1.0) and res["hits"] == [False, False]


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_items():
    few = [1, 0] * 10
    many = [1, 0] * 500
    lo, hi = mcq.bootstrap_interval(few)
    assert lo < 0.5 < hi and mcq.bootstrap_interval(few) == (lo, hi)  # seeded: the same every time
    lo2, hi2 = mcq.bootstrap_interval(many)
    assert lo < lo2 < 0.5 < hi2 < hi and hi2 - lo2 < 0.08  # about 2 x 1.96 x 0.5 / sqrt(1000) = 0.062
    assert mcq.bootstrap_interval([1] * 30) == (1.0, 1.0)


def test_task_from_the_file_name_and_evaluate(ckpt, tmp_path):
    assert mcq.task_of("x/mcq_boolq_dev.jsonl") == "boolq" and mcq.task_of("mcq_obqa_test.jsonl") == "openbookqa"
    with pytest.raises(ValueError, match="cannot tell the task"):
        mcq.task_of("questions.jsonl")
    f = tmp_path / "mcq_arc_easy_test.jsonl"
    f.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    m, tok = model_lib.load_model(ckpt), data.load_tokenizer(ckpt)
    r = mcq.evaluate(m, tok, f, limit=2)
    assert r["task"] == "arc" and r["n"] == 2 and 0 <= r["acc"] <= 1
    assert r["acc_ci"][0] <= r["acc"] <= r["acc_ci"][1] and r["items_per_s"] > 0
