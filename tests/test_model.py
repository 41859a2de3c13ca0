"""model.py against transformers' LlamaForCausalLM, plus loading/saving/generation."""
import dataclasses
import json

import pytest
import torch

import data
import generation
from kernels import packed_linear
import lora
import model as model_lib
from tests.tiny import random_model, tiny_ckpt, tiny_config

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gqa-tied": {},
    "mha-untied": {"num_key_value_heads": 4, "tie_word_embeddings": False},
    "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                    "rope_theta": 500000.0},
    "rope-parameters-block": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16}},
    "bias-headdim": {"attention_bias": True, "mlp_bias": True, "head_dim": 24},
}


def hf_model(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(hf, ids, mask):
    # transformers takes positions as given; ours come from the mask (left padding = no shift).
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def left_padded_batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[2, :19] = 0
    return ids, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    ckpt = tiny_ckpt(tmp_path / "m", **CONFIGS[name])
    ours = model_lib.load_model(ckpt, device="cpu")
    ids, mask = left_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        mine = ours(ids, mask)
    ref = hf_logits(hf_model(ckpt), ids, mask)
    real = mask.bool()
    assert (mine[real] - ref[real]).abs().max().item() < 1e-4
    # A left-padded row equals the same tokens without padding.
    with torch.no_grad():
        alone = ours(ids[2:, 19:])
    assert (mine[2, 19:] - alone[0]).abs().max().item() < 1e-4


def test_save_roundtrip_sharded_loads_in_transformers(tmp_path):
    m = random_model(1, tie_word_embeddings=False)
    tiny_ckpt(tmp_path / "src")  # only for its tokenizer files
    out = model_lib.save_model(m, tmp_path / "out", tokenizer_dir=tmp_path / "src", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.json").is_file()
    ids, mask = left_padded_batch(320)
    with torch.no_grad():
        mine = m(ids, mask)
        again = model_lib.load_model(out, device="cpu")(ids, mask)
    ref = hf_logits(hf_model(out), ids, mask)
    real = mask.bool()
    assert torch.equal(mine, again)
    assert (mine[real] - ref[real]).abs().max().item() < 1e-4
    # Saving over an existing checkpoint replaces it whole and leaves no temp folders.
    model_lib.save_model(random_model(2), out, tokenizer_dir=tmp_path / "src")
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_kv_cache_forward_equals_full_forward():
    m = random_model(3)
    ids, mask = left_padded_batch(320)
    with torch.no_grad():
        full = m(ids, mask)
        cache = generation.KVCache(m.config, 3, 40, "cpu", torch.float32)
        first = m(ids[:, :30], mask[:, :30], cache=cache)
        rest = [m(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache) for t in range(30, 40)]  # the cache knows where
    assert cache.length == 40
    stepped = torch.cat([first] + rest, dim=1)
    real = mask.bool()
    assert (stepped[real] - full[real]).abs().max().item() < 1e-4


def assert_batch_trains_as_its_rows_alone(m, ids, mask):
    """The outputs of the batch [B, T] at its real slots, and the weight
    gradients of a loss on all of them, equal those of each row run alone."""
    hidden = m(ids, mask, return_hidden=True)
    assert hidden[~mask.bool()].abs().max() == 0  # padding slots are zeros
    hidden[mask.bool()].sin().sum().backward()
    together = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    for row in range(len(ids)):
        real = mask[row].bool()
        alone = m(ids[row:row + 1, real], return_hidden=True)[0]
        assert (alone - hidden[row, real]).abs().max().item() < 1e-5, row
        alone.sin().sum().backward()
    for n, p in m.named_parameters():
        assert (p.grad - together[n]).abs().max().item() < 1e-4 * max(1.0, together[n].abs().max().item()), n


@pytest.mark.parametrize("checkpointing", [False, True])
def test_padded_batch_trains_as_its_rows_alone(checkpointing):
    """With padding the model computes on the real tokens only (Llama.forward)."""
    m = random_model(3).train()
    m.gradient_checkpointing = checkpointing
    ids, mask = left_padded_batch(320)
    mask[0, 33:] = 0  # and right padding
    assert_batch_trains_as_its_rows_alone(m, ids, mask)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_beginning_every_row_shares_runs_once_and_trains_as_each_row_alone(checkpointing):
    """Rows that start alike (a chat template's system prompt): the layers run
    those slots in row 0 only, yet the batch trains as its rows alone."""
    m = random_model(5).train()
    m.gradient_checkpointing = checkpointing
    g = torch.Generator().manual_seed(2)
    common = torch.randint(3, 320, (6,), generator=g).tolist()
    rows = [common + torch.randint(3, 320, (n,), generator=g).tolist() for n in (9, 1, 4)]
    rows.append(list(rows[0]))  # a row twice: every slot alike
    ids, mask = data.right_pad(rows, 0)
    computed = m.token_layout(ids, mask.bool())
    assert len(computed.keep) == int(mask.sum()) - 3 * len(common)  # the beginning once, not 4 times
    assert_batch_trains_as_its_rows_alone(m, ids, mask)


def test_shared_prefix_length():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 0]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    assert model_lib.shared_prefix_length(ids, valid) == 2
    assert model_lib.shared_prefix_length(ids[:1], valid[:1]) == 0  # one row: nothing to share
    assert model_lib.shared_prefix_length(ids[[0, 0]], valid[:2]) == 4
    left_padded = valid.clone()
    left_padded[1, 0] = False
    assert model_lib.shared_prefix_length(ids, left_padded) == 0
    segments = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    assert model_lib.shared_prefix_length(ids, valid, segments) == 1  # row 1's slot 1 is in another segment
    assert model_lib.TokenLayout.of(ids[:1], valid[:1]).keep is None  # nothing to skip


def test_token_layout_round_trip_and_switches():
    """to_tokens then to_batch gives back every computed slot (shared slots
    from row 0, zeros at padding); the model's switches turn the skipping off,
    and with both off every slot is computed (the layout is the identity)."""
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [5, 6, 7, 2]])
    valid = ids != 0
    layout = model_lib.TokenLayout.of(ids, valid)
    assert (layout.shared, layout.num_tokens(ids)) == (2, 11 - 4)  # 2 shared slots once, padding skipped
    x = torch.arange(12.0).view(3, 4, 1) + 1
    back = layout.to_batch(layout.to_tokens(x))
    want = torch.where(valid[..., None], x, 0.0)
    want[1:, :2] = x[:1, :2]
    assert torch.equal(back, want)
    assert model_lib.TokenLayout.of(ids, valid, share_prefix=False).num_tokens(ids) == 11
    assert model_lib.TokenLayout.of(ids, valid, skip_padding=False).num_tokens(ids) == 12 - 4
    dense = model_lib.TokenLayout.of(ids, valid, skip_padding=False, share_prefix=False)
    assert dense.keep is None and dense.to_tokens(x) is x and dense.to_batch(x) is x
    m = random_model(6)
    with torch.no_grad():
        fast = m(ids, valid.long())
        m.skip_padding = m.share_prefix = False
        plain = m(ids, valid.long())
    assert (fast[valid] - plain[valid]).abs().max().item() < 1e-5


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("common", [0, 5])
def test_pair_rows_compute_each_answer_as_prompt_plus_answer_alone(checkpointing, common):
    """data.collate_pairs puts [prompt | chosen | rejected] in one row; with
    `segments` each answer's hidden states (positions included) and the
    weight gradients equal those of prompt + answer run as separate rows,
    also when the prompts begin alike (`common` tokens, run once)."""
    m = random_model(4).train()
    m.gradient_checkpointing = checkpointing
    g = torch.Generator().manual_seed(1)
    start = torch.randint(3, 320, (common,), generator=g).tolist()
    ex = [{"prompt_ids": start + torch.randint(3, 320, (n,), generator=g).tolist(),
           "chosen_ids": torch.randint(3, 320, (c,), generator=g).tolist(),
           "rejected_ids": torch.randint(3, 320, (r,), generator=g).tolist(), "index": i}
          for i, (n, c, r) in enumerate([(7, 5, 9), (1, 3, 2), (12, 10, 4)])]  # a one-token prompt too
    batch = data.collate_pairs(ex, pad_id=0)
    computed = m.token_layout(batch["input_ids"], batch["attention_mask"].bool(), batch["segments"])
    assert len(computed.keep) == int(batch["attention_mask"].sum()) - 2 * common
    hidden = m(batch["input_ids"], batch["attention_mask"], return_hidden=True, segments=batch["segments"])
    seg = batch["segments"]
    hidden[batch["attention_mask"].bool()].sin().sum().backward()
    packed = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    for row, e in enumerate(ex):
        for k, key in ((1, "chosen_ids"), (2, "rejected_ids")):
            alone = m(torch.tensor([e["prompt_ids"] + e[key]]), return_hidden=True)[0]  # [n + len, H]
            mine = torch.cat([hidden[row, seg[row] == 0], hidden[row, seg[row] == k]])  # prompt[:-1], prompt[-1] + answer
            assert (alone - mine).abs().max().item() < 1e-5, (row, key)
            shared = len(e["prompt_ids"]) - 1  # run twice here, once in the pair row: half weight each time
            (alone[shared:].sin().sum() + 0.5 * alone[:shared].sin().sum()).backward()
    for n, p in m.named_parameters():
        assert (p.grad - packed[n]).abs().max().item() < 1e-4 * max(1.0, packed[n].abs().max().item()), n


def naive_greedy(m, ids, n, stop):
    """Recompute the whole sequence every step: the obvious twin of generate()."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = m(torch.tensor([ids + out]))[0, -1].argmax().item()
        out.append(nxt)
        if nxt in stop:
            break
    return out


def test_generate_greedy_matches_naive_loop_with_left_padding(tmp_path):
    ckpt = tiny_ckpt(tmp_path / "m", seed=4)
    m, tok = model_lib.load_model(ckpt, device="cpu"), data.load_tokenizer(ckpt)
    prompts = ["What is the capital of France?", "Hi", "Below is an instruction that describes a task."]
    # A random model rarely says <|im_end|>: also make the 3rd greedy token of the
    # first prompt a stop id, so that row stops early while the others go on.
    third = naive_greedy(m, data.encode_prompt(tok, prompts[0]), 3, set())[2]
    tok = dataclasses.replace(tok, stop_ids=tok.stop_ids | {third})
    res = generation.generate(m, tok, prompts, max_new_tokens=12, batch_size=3)
    assert res[0][0]["finished"] and len(res[0][0]["ids"]) <= 2  # 1 of 3 rows done: it leaves the batch
    assert generation.generate(m, tok, prompts, max_new_tokens=12, batch_size=3, drop_finished=False) == res
    for p, r in zip(prompts, res):
        want = naive_greedy(m, data.encode_prompt(tok, p), 12, tok.stop_ids)
        finished = want[-1] in tok.stop_ids
        assert r[0]["finished"] == finished
        assert r[0]["ids"] == (want[:-1] if finished else want)  # the stop token is not part of the answer
        assert r[0]["text"] == tok.decode(r[0]["ids"])


def test_generate_sampling_is_seeded_and_shares_prefix(tmp_path):
    ckpt = tiny_ckpt(tmp_path / "m", seed=5)
    m, tok = model_lib.load_model(ckpt), data.load_tokenizer(ckpt)
    kw = dict(max_new_tokens=10, temperature=0.85, top_p=0.95, num_samples=4, batch_size=8)
    a = generation.generate(m, tok, ["Hi", "What is the capital?"], seed=7, **kw)
    b = generation.generate(m, tok, ["Hi", "What is the capital?"], seed=7, **kw)
    c = generation.generate(m, tok, ["Hi", "What is the capital?"], seed=8, **kw)
    assert a == b and a != c
    assert [len(r) for r in a] == [4, 4]
    assert len({tuple(s["ids"]) for s in a[0]}) > 1  # the K samples differ
    assert all(len(s["ids"]) <= 10 for r in a for s in r)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


@needs_onednn
def test_packed_linear_equals_linear_and_is_put_back():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(3, 5, 24, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(packed_linear.PackedLinear(lin.weight, lin.bias, rows=3)(x), lin(x),
                                   rtol=1e-5, atol=1e-5)
    m = random_model(7)
    lora.add_lora(m, rank=2, targets=("q_proj",))
    before = dict(m.named_modules())
    with packed_linear.packed_linears(m, rows=4):
        kinds = {type(mod).__name__ for name, mod in m.named_modules() if name.endswith(("k_proj", "q_proj"))}
        assert kinds == {"PackedLinear", "LoRALinear"}  # LoRA layers are left alone
    after = dict(m.named_modules())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)


@needs_onednn
def test_generate_packed_equals_unpacked(tmp_path):
    ckpt = tiny_ckpt(tmp_path / "m", seed=8)
    m, tok = model_lib.load_model(ckpt, device="cpu"), data.load_tokenizer(ckpt)
    prompts = ["Hi", "What is the capital of France?"]
    kw = dict(max_new_tokens=10, temperature=0.85, top_p=0.95, num_samples=2, seed=3)
    assert generation.generate(m, tok, prompts, pack=True, **kw) == generation.generate(m, tok, prompts, pack=False, **kw)


def test_sample_next_top_p_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {generation.sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 so token 1 is needed; 0.8 >= 0.7 so token 2 is not
    draws = {generation.sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(50)}
    assert draws == {0}
    assert generation.sample_next(logits, 0.0).item() == 0
    # Only the 2 most likely are sorted: they hold 0.8 >= 0.7, so the answer is the same.
    draws = {generation.sample_next(logits, 1.0, top_p=0.7, generator=g, candidates=2).item() for _ in range(200)}
    assert draws == {0, 1}
    # A flat distribution's nucleus is wider than 16 candidates: the full sort takes over.
    flat = torch.zeros(1, 5000)
    draws = {generation.sample_next(flat, 1.0, top_p=0.9, generator=g, candidates=16).item() for _ in range(200)}
    assert len(draws) > 150


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_lib.load_model(tmp_path / "nope")
    ckpt = tiny_ckpt(tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    bad = dict(cfg, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    (ckpt / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="yarn.*supported"):
        model_lib.load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, hidden_size=32, head_dim=16)))
    with pytest.raises(ValueError, match="model.embed_tokens.weight.*shape"):
        model_lib.load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(KeyError, match="missing.*model.layers.2"):
        model_lib.load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    with pytest.raises(KeyError, match="model.layers.1.* not a parameter"):
        model_lib.load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, vocab_size=100)))
    with pytest.raises(ValueError, match="does not fit"):
        data.load_tokenizer(ckpt)


def test_reward_head_reads_last_real_token(tmp_path):
    m = random_model(6, architectures=["LlamaForSequenceClassification"], num_labels=1)
    tiny_ckpt(tmp_path / "src")
    out = model_lib.save_model(m, tmp_path / "rm", tokenizer_dir=tmp_path / "src")
    ours = model_lib.load_model(out, device="cpu")
    hf = transformers.LlamaForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(3, 320, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    hf.config.pad_token_id = 0
    ids[1, 8:] = 0
    with torch.no_grad():
        mine = ours.reward(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (mine - ref).abs().max().item() < 1e-4


def test_reward_on_pair_rows_equals_each_answer_alone():
    """With segments, the score is read at the last token of each branch."""
    m = random_model(7, architectures=["LlamaForSequenceClassification"], num_labels=1)
    ex = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12], "index": 0},
          {"prompt_ids": [13, 14], "chosen_ids": [15], "rejected_ids": [16, 17, 18], "index": 1}]
    batch = data.collate_pairs(ex, pad_id=0)
    with torch.no_grad():
        pair = m.reward(batch["input_ids"], batch["attention_mask"], batch["segments"])  # [B, 2]
        for row, e in enumerate(ex):
            for k, key in enumerate(("chosen_ids", "rejected_ids")):
                alone = m.reward(torch.tensor([e["prompt_ids"] + e[key]]), torch.ones(1, len(e["prompt_ids"]) + len(e[key])))
                assert abs(pair[row, k].item() - alone.item()) < 1e-5
