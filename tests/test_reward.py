"""reward.py: the reward model's layout (against transformers), scoring, and Bradley-Terry training."""
import json

import pytest
import torch

import data
import model as model_lib
import reward
from tests.tiny import tiny_ckpt

SAFE = ["I can't help with that request, but here is a safer alternative.", "I can't help with that."]
UNSAFE = ["Sure! Here is how you do it: first, second, third.", "Sure! The quick brown fox jumps."]


def random_head(rm, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5)
    return rm


def test_init_from_causal_lm_drops_lm_head_and_starts_at_zero(tmp_path):
    ckpt = tiny_ckpt(tmp_path / "lm", tie_word_embeddings=False)
    tok = data.load_tokenizer(ckpt)
    rm = reward.init_reward_model(ckpt, tok, layers=1)
    names = dict(rm.named_parameters())
    assert "lm_head.weight" not in names and names["score.weight"].shape == (1, 64)
    assert "model.layers.1.mlp.up_proj.weight" not in names  # only the lowest layer kept
    lm = model_lib.load_model(ckpt)
    assert torch.equal(names["model.layers.0.self_attn.q_proj.weight"], lm.model.layers[0].self_attn.q_proj.weight)
    assert reward.score_texts(rm, tok, ["Hi", "What?"], ["Sure!", "No."]) == [0.0, 0.0]
    out = model_lib.save_model(random_head(rm), tmp_path / "rm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    # pad_token_id 0, not the end-of-turn id 2 that every scored sequence ends with
    assert (cfg["num_labels"], cfg["pad_token_id"], cfg["num_hidden_layers"]) == (1, 0, 1)
    assert (out / "tokenizer.json").is_file()


def test_reward_model_matches_transformers(tmp_path):
    """Saved by us, loaded by transformers' LlamaForSequenceClassification (which
    finds the last token through pad_token_id): the same scores as score_texts."""
    transformers = pytest.importorskip("transformers")
    ckpt = tiny_ckpt(tmp_path / "lm", seed=3)
    tok = data.load_tokenizer(ckpt)
    out = model_lib.save_model(random_head(reward.init_reward_model(ckpt, tok)), tmp_path / "rm")
    ours = reward.load_reward_model(out)
    hf = transformers.LlamaForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    prompts = ["What is the capital of France?", "Hi", "Tell me how to pick a lock."]
    answers = ["Paris is the capital of France.", "Hello! How can I help you today?", SAFE[0]]
    mine = reward.score_texts(ours, tok, prompts, answers, batch_size=2)
    ref = []
    for p, a in zip(prompts, answers):  # one row at a time: no padding for transformers to interpret
        ids = torch.tensor([data.encode_prompt(tok, p) + data.encode_response(tok, p, a)])
        with torch.no_grad():
            ref.append(hf(input_ids=ids).logits[0, 0].item())
    assert max(abs(x - y) for x, y in zip(mine, ref)) < 1e-4
    assert len(set(round(x, 4) for x in mine)) == 3  # a real head: the scores differ
    # Batched, padded with the config's pad_token_id as score_texts pads.
    seqs = [data.encode_prompt(tok, p) + data.encode_response(tok, p, a) for p, a in zip(prompts, answers)]
    ids, mask = data.right_pad(seqs, reward.reward_pad_id(tok))
    with torch.no_grad():
        batched = hf(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    assert max(abs(x - y) for x, y in zip(batched, ref)) < 1e-4


def test_load_reward_model_rejects_a_causal_lm(tmp_path):
    ckpt = tiny_ckpt(tmp_path / "lm")
    with pytest.raises(ValueError, match="not a scalar reward model"):
        reward.load_reward_model(ckpt)


def test_split_pairs_keeps_prompts_disjoint():
    pairs = [{"prompt": f"q{i % 30}", "chosen": "a", "rejected": "b"} for i in range(60)]
    train, held = reward.split_pairs(pairs, 20, 10, seed=0)
    assert len(train) == 20 and len(held) == 10
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}
    with pytest.raises(ValueError, match="lower --train-pairs"):
        reward.split_pairs(pairs, 20, 50, seed=0)  # 50 held out leave 10


def test_prompt_bootstrap_interval_counts_prompts_not_pairs():
    correct = [True] * 50 + [False] * 50
    assert reward.prompt_bootstrap([True] * 12, [f"q{i % 3}" for i in range(12)]) == (1.0, 1.0)
    # The same 100 outcomes: 100 independent prompts, or 10 prompts each all right or all wrong.
    low_i, high_i = reward.prompt_bootstrap(correct, [f"q{i}" for i in range(100)])
    low_g, high_g = reward.prompt_bootstrap(correct, [f"q{i // 10}" for i in range(100)])
    assert low_i < 0.5 < high_i and low_g < 0.5 < high_g
    assert 0.15 < high_i - low_i < 0.25  # about 4 standard errors of 0.05
    assert high_g - low_g > 2 * (high_i - low_i)  # 10 prompts tell far less than 100


def test_training_on_a_toy_set_reaches_accuracy_one(tmp_path):
    ckpt = tiny_ckpt(tmp_path / "lm", seed=1)
    pairs = [{"prompt": f"Question number {i}: can you help me?", "chosen": SAFE[i % 2], "rejected": UNSAFE[i % 3 % 2]}
             for i in range(48)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    before = reward.pairwise_accuracy(random_head(reward.init_reward_model(ckpt, data.load_tokenizer(ckpt), device="cpu"),
                                                  seed=5),
                                      data.load_tokenizer(ckpt), pairs[32:])
    result = reward.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "pairs.jsonl"), "--out",
                          str(tmp_path / "rm"), "--train-pairs", "32", "--eval-pairs", "16", "--lr", "3e-3",
                          "--epochs", "4", "--batch-size", "8", "--log-every", "0"])
    assert before["accuracy"] < 1.0  # a random head does not already separate them
    assert result["accuracy"] == 1.0 and result["pairs"] == 16 and result["margin"] > 1.0
    saved = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert saved["accuracy"] == 1.0
    log = [json.loads(line) for line in (tmp_path / "rm" / "log.jsonl").read_text().splitlines()]
    assert abs(log[0]["loss"] - 0.6931) < 1e-3  # zero head: every reward 0, loss log 2
    # The saved model scores the same as the one that was evaluated.
    again = reward.pairwise_accuracy(reward.load_reward_model(tmp_path / "rm"), data.load_tokenizer(ckpt), pairs[:4])
    assert again["accuracy"] == 1.0


def test_head_only_fit_is_a_probe_the_saved_model_reproduces(tmp_path):
    """--train-layers 0: the backbone is unchanged, only score.weight is fitted,
    and the saved model's scores are the ones the fit optimised."""
    ckpt = tiny_ckpt(tmp_path / "lm", seed=1)
    tok = data.load_tokenizer(ckpt)
    pairs = [{"prompt": f"Question number {i}: can you help me?", "chosen": SAFE[i % 2], "rejected": UNSAFE[i % 3 % 2]}
             for i in range(48)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = reward.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "rm"),
                          "--train-pairs", "32", "--eval-pairs", "16", "--train-layers", "0", "--head-l2", "1e-3"])
    assert result["accuracy"] == 1.0 and result["pairs"] == 16
    rm = reward.load_reward_model(tmp_path / "rm")
    lm = model_lib.load_model(ckpt)
    backbone = {k: v for k, v in lm.state_dict().items() if k.startswith("model.")}
    assert all(torch.equal(v, rm.state_dict()[k]) for k, v in backbone.items())
    assert rm.score.weight.abs().sum() > 0
    # The fit's own margin is the saved model's mean margin on the training pairs.
    fit = json.loads((tmp_path / "rm" / "log.jsonl").read_text().splitlines()[0])
    train_pairs, _ = reward.split_pairs(pairs, 32, 16, seed=0)
    again = reward.pairwise_accuracy(rm, tok, train_pairs)
    assert again["accuracy"] == fit["rewards/accuracies"] == 1.0
    assert abs(again["margin"] - fit["rewards/margins"]) < 1e-3 * max(1.0, abs(fit["rewards/margins"]))


def test_probe_first_starts_the_layers_from_the_fitted_head(tmp_path):
    ckpt = tiny_ckpt(tmp_path / "lm", seed=1)
    pairs = [{"prompt": f"Question number {i}: can you help me?", "chosen": SAFE[i % 2], "rejected": UNSAFE[i % 3 % 2]}
             for i in range(48)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = reward.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "rm"),
                          "--train-pairs", "32", "--eval-pairs", "16", "--train-layers", "1", "--probe-first",
                          "--lr", "1e-3", "--batch-size", "8", "--log-every", "0"])
    log = [json.loads(line) for line in (tmp_path / "rm" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and [r["step"] for r in log[1:]] == [1, 2, 3, 4]
    assert log[1]["loss"] < 0.6931 - 0.1  # not a zero head's log 2: the fitted one
    assert result["accuracy"] == 1.0
