"""bench/probe_refusal.py: the ROC numbers, the linear probe, and what it reads from the model."""
import json

import pytest
import torch

import data
import model as model_lib
from bench import probe_refusal as pr
from tiny import tiny_ckpt


def test_auc_counts_ordered_pairs_and_half_ties():
    labels = torch.tensor([True, False, True, False])
    # positives 0.9, 0.3 vs negatives 0.8, 0.1: 0.9 beats both, 0.3 beats 0.1 only
    assert pr.auc(torch.tensor([0.9, 0.8, 0.3, 0.1]), labels) == 0.75
    assert pr.auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5


def test_caught_at_allows_at_most_the_given_share_of_negatives():
    neg = torch.arange(20.0)  # 19 ... 0: 15% of 20 = 3 of them (19, 18, 17) may lie above the threshold
    pos = torch.tensor([18.5, 16.5, 10.0])
    scores, labels = torch.cat([pos, neg]), torch.tensor([True] * 3 + [False] * 20)
    assert pr.caught_at(scores, labels, 0.15) == pytest.approx(2 / 3)
    assert pr.caught_at(scores, labels, 0.0) == 0.0


def test_probe_finds_a_small_signal_beside_a_huge_nuisance_dimension():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(400, generator=g) < 0.5
    x = torch.randn(400, 8, generator=g)
    x[:, 0] *= 1000.0  # a few huge dimensions, as in SmolLM2's hidden states
    x[:, 3] += 2.0 * (2 * y.float() - 1)  # d' = 4: a Bayes-optimal AUC of 0.998
    score = pr.fit_probe(x[:300], y[:300])
    assert pr.auc(score(x[300:]), y[300:]) > 0.97
    assert pr.auc(score(x[300:]), ~y[300:]) < 0.1


def test_prompt_states_read_each_layer_at_the_prompt_end(tmp_path):
    ckpt = tiny_ckpt(tmp_path / "m", num_hidden_layers=3)
    model, tok = model_lib.load_model(ckpt, device="cpu").eval(), data.load_tokenizer(ckpt)
    openers = [5, 7]
    hidden, p_refuse = pr.prompt_states(model, tok, ["Do A", "What is the capital of France?"], openers)
    assert hidden.shape == (2, 3, 64)
    with torch.no_grad():
        ids = torch.tensor([data.encode_prompt(tok, "What is the capital of France?")])
        final = model(ids, return_hidden=True)[0, -1]  # final norm of the last layer's output
        probs = model(ids)[0, -1].softmax(-1)
    torch.testing.assert_close(model.model.norm(hidden[1, -1]), final)
    torch.testing.assert_close(p_refuse[1], probs[openers].sum())


def test_main_prints_a_row_per_checkpoint_and_rejects_unlabelled_pairs(tmp_path, capsys):
    ckpt = tiny_ckpt(tmp_path / "m")
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"harm {i}", "chosen": "I can't help with that.", "rejected": "Sure", "kind": "harmful"}
            for i in range(6)]
    rows += [{"prompt": f"fine {i}", "chosen": "Sure! Here is how.", "rejected": "I can't", "kind": "benign"}
             for i in range(6)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "h.txt").write_text("harm 7\nharm 8\n")
    (tmp_path / "b.txt").write_text("fine 7\nfine 8\n")
    args = ["--ckpt", str(ckpt), "--pairs", str(pairs), "--harmful", str(tmp_path / "h.txt"),
            "--benign", str(tmp_path / "b.txt"), "--every", "1"]
    pr.main(args)
    out = capsys.readouterr().out
    assert "12 training prompts, 4 held-out (2 harmful)" in out
    assert out.count(f"| {ckpt} |") == 1
    rows[3]["kind"] = "unsafe"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"pairs.jsonl:4: field `kind`"):
        pr.main(args)
