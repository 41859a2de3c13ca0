"""bench/reward_depth.py: the per-depth features are what a shallower reward
model's head reads, and cross-validation keeps whole prompts apart."""
import json

import torch

import data
import reward
from bench import reward_depth as rd
from test_reward import SAFE, UNSAFE
from tiny import tiny_ckpt


def toy_pairs(n):
    return [{"prompt": f"Question number {i // 2}: can you help me?" + " please" * (i % 5),
             "chosen": SAFE[i % 2], "rejected": UNSAFE[i % 3 % 2]} for i in range(n)]


def test_features_at_depth_d_are_what_a_d_layer_reward_model_reads(tmp_path):
    ckpt = tiny_ckpt(tmp_path / "lm", num_hidden_layers=3)
    tok = data.load_tokenizer(ckpt)
    examples, _ = data.tokenize_pairs(tok, toy_pairs(6), 256)  # prompts of different lengths: padding
    feats = rd.pair_features(reward.init_reward_model(ckpt, tok, device="cpu"), examples, tok.pad_id, batch_size=4)
    assert feats.shape == (6, 2, 3, 64)
    batch = data.collate_pairs(examples, tok.pad_id)
    for depth in (1, 2, 3):
        shallow = reward.init_reward_model(ckpt, tok, layers=depth, device="cpu").eval()
        with torch.no_grad():
            want = shallow.reward_features(batch["input_ids"], batch["attention_mask"], batch["segments"])
        torch.testing.assert_close(feats[:, :, depth - 1], want, atol=1e-5, rtol=1e-5)


def test_cv_finds_a_signal_and_only_that():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 2, 8, generator=g)
    feats[:, :, 0] *= 1000.0  # a huge nuisance dimension, as in SmolLM2's hidden states
    prompts = [f"q{i // 3}" for i in range(300)]
    assert abs(rd.cv_accuracy(feats, prompts, l2=0.1) - 0.5) < 0.1  # noise: chance
    feats[:, 0, 5] += 1.5  # chosen answers lean one way on one dimension
    assert rd.cv_accuracy(feats, prompts, l2=0.1) > 0.8
    correct = rd.held_out_correct(feats[:200], feats[200:], l2=0.1)
    assert correct.shape == (100,) and correct.double().mean() > 0.8


def test_main_prints_the_pick_and_the_reward_command(tmp_path, capsys):
    ckpt = tiny_ckpt(tmp_path / "lm", num_hidden_layers=2)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in toy_pairs(48)))
    rd.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "pairs.jsonl"), "--train-pairs", "30",
             "--eval-pairs", "10", "--min-depth", "1", "--l2", "0.1,1"])
    out = capsys.readouterr().out
    assert "| 1 | " in out and "| 2 | " in out and "picked by CV: depth" in out
    assert "--train-layers 0 --head-l2" in out
