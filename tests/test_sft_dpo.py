"""sft.py and dpo.py end to end on a tiny random model: first DPO loss, learning,
resume, NaN guard, masking, and 2-process DDP against 1 process."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import data
import dpo
import losses
import sft
from tests.tiny import tiny_ckpt
from tests.tiny import train_argv as args

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "The quick brown fox", "Write a response", "Sure! Here is how",
           "I can't help with that", "What is 0123?", "Describe the lazy dog", "Below is an instruction"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_ckpt(tmp_path_factory.mktemp("tiny") / "m"))


@pytest.fixture(scope="module")
def toy_prefs(tmp_path_factory):
    """Chosen always answers "A", rejected always "B"."""
    f = tmp_path_factory.mktemp("prefs") / "ab.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "chosen": "A", "rejected": "B"}) + "\n" for p in PROMPTS * 2))
    return str(f)


@pytest.fixture(scope="module")
def memo_set(tmp_path_factory):
    f = tmp_path_factory.mktemp("sft") / "memo.json"
    f.write_text(json.dumps([{"instruction": p, "input": "", "output": "Paris is the capital of France."}
                             for p in PROMPTS]))
    return str(f)


def log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_dpo_first_loss_is_log2_and_toy_preference_is_learned(ckpt, toy_prefs, tmp_path):
    dpo.main(args(ckpt, toy_prefs, tmp_path / "run", "--max-steps", 8, "--lr", 3e-3))
    rows = log(tmp_path / "run")
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5  # policy == reference at step 0
    assert abs(rows[0]["rewards/margins"]) < 1e-5
    assert rows[-1]["rewards/accuracies"] == 1.0 and rows[-1]["rewards/margins"] > 1.0
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "lr", "grad_norm",
            "tokens_per_s"} <= set(rows[0])
    out = tmp_path / "run"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file() and common.is_finished(out)
    assert (out / "curves.png").is_file() and json.loads((out / "train_config.json").read_text())["beta"] == 0.1
    assert (out / "state" / "ref_logps.pt").is_file()


@pytest.mark.parametrize("opening_words", [0, 1])
def test_dpo_nll_weight_adds_the_chosen_per_token_nll(ckpt, toy_prefs, tmp_path, opening_words):
    dpo.main(args(ckpt, toy_prefs, tmp_path / "rpo", "--max-steps", 1, "--nll-weight", 0.5,
                  "--opening-words", opening_words))
    first = log(tmp_path / "rpo")[0]
    # every chosen answer: "A" + end of turn; with --opening-words, "A" alone
    n = len(data.encode_response(data.load_tokenizer(ckpt), "Q", "A", closed=not opening_words))
    assert first["nll/chosen"] == pytest.approx(-first["logps/chosen"] / n, rel=1e-5)
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["nll/chosen"], rel=1e-5)


def test_balance_weights_give_every_group_the_same_total():
    w = dpo.balance_weights(["harmful"] * 3 + ["benign"])
    assert w.tolist() == pytest.approx([2 / 3] * 3 + [2.0])  # N / (G n_g): 4 / (2 * 3), 4 / (2 * 1)
    assert float(w[:3].sum()) == pytest.approx(float(w[3:].sum())) and float(w.mean()) == pytest.approx(1.0)
    assert dpo.balance_weights(["x"] * 5).tolist() == [1.0] * 5


def test_dpo_balance_by_weights_each_pair_by_its_group(ckpt, tmp_path):
    rows = [{"prompt": p, "chosen": "A", "rejected": "B", "kind": "a" if i < 12 else "b"}
            for i, p in enumerate(PROMPTS * 2)]
    f = tmp_path / "kinds.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for name, extra in (("plain", []), ("balanced", ["--balance-by", "kind"])):
        dpo.main(args(ckpt, str(f), tmp_path / name, "--max-steps", 2, "--batch-size", 16, "--lr", 3e-3, *extra))
        runs[name] = log(tmp_path / name)
    weights = json.loads((tmp_path / "balanced" / "train_config.json").read_text())["pair_weights"]
    assert weights == pytest.approx({"a": 16 / 24, "b": 2.0})
    # one step over all 16 pairs: the weights average 1, so the first loss is still log 2 ...
    assert runs["balanced"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # ... but the 4 "b" pairs weigh 3x the others, which changes the step and every later loss
    assert abs(runs["balanced"][1]["loss"] - runs["plain"][1]["loss"]) > 1e-4
    f.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "kind"}) + "\n" for r in rows))
    with pytest.raises(KeyError, match=r"kinds.jsonl:1: missing field 'kind'"):
        dpo.main(args(ckpt, str(f), tmp_path / "missing", "--max-steps", 1, "--balance-by", "kind"))


def test_dtype_auto_resolves_to_what_the_hardware_has(ckpt, memo_set, tmp_path):
    import common
    sft.main(args(ckpt, memo_set, tmp_path / "auto", "--max-steps", 1, "--dtype", "auto"))
    saved = json.loads((tmp_path / "auto" / "train_config.json").read_text())["dtype"]
    assert saved == ("bf16" if common.native_bf16(torch.device("cpu")) else "fp32")


def test_optimizer_is_fused_adamw_on_cpu_and_steps_like_the_loop():
    """common.make_optimizer picks the fused AdamW; one step equals the plain loop's."""
    import types

    import common
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    args = types.SimpleNamespace(lr=1e-2, weight_decay=0.1, warmup_steps=0)
    opt, _ = common.make_optimizer(a, args, total_steps=10)
    assert opt.defaults["fused"] is True
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(3, 8)
    for m, o in ((a, opt), (b, ref)):
        m(x).square().sum().backward()
        o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_pair_rows_give_the_plain_twins_logps_and_gradients(impl):
    """dpo.pair_logps (one row per pair, prompt once, padding and shared
    beginnings skipped, log-probs from hidden states) against its plain twin
    (chosen and rejected as [2B, T] rows, full logits, every slot computed)."""
    from tests.tiny import random_model

    g = torch.Generator().manual_seed(3)
    start = torch.randint(3, 320, (4,), generator=g).tolist()  # a beginning every prompt shares
    ex = [{"prompt_ids": start + torch.randint(3, 320, (n,), generator=g).tolist(),
           "chosen_ids": torch.randint(3, 320, (c,), generator=g).tolist(),
           "rejected_ids": torch.randint(3, 320, (r,), generator=g).tolist(), "index": i}
          for i, (n, c, r) in enumerate([(6, 5, 9), (1, 3, 2), (10, 7, 4)])]
    m = random_model(2).train()
    cli = dpo.build_parser().parse_args(["--data", "x", "--out", "y", "--logprob-impl", impl])
    fast = dpo.pair_logps(m, m.lm_head_weight, data.collate_pairs(ex, 0), "cpu", cli)
    (fast[0] - 2 * fast[1]).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.skip_padding = m.share_prefix = False
    plain = dpo.pair_logps_plain(m, ex, pad_id=0)
    (plain[0] - 2 * plain[1]).sum().backward()
    for f, p in zip(fast, plain):
        assert (f - p).abs().max().item() < 1e-4
    for n, p in m.named_parameters():
        assert (p.grad - grads[n]).abs().max().item() < 1e-4 * max(1.0, grads[n].abs().max().item()), n


def test_dpo_reference_model_equals_precompute(ckpt, toy_prefs, tmp_path):
    dpo.main(args(ckpt, toy_prefs, tmp_path / "pre", "--max-steps", 3, "--lr", 1e-3))
    dpo.main(args(ckpt, toy_prefs, tmp_path / "mod", "--max-steps", 3, "--lr", 1e-3, "--ref", "model",
                  "--logprob-impl", "naive"))
    for a, b in zip(log(tmp_path / "pre"), log(tmp_path / "mod")):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-4


def test_top_k_kl_is_the_full_kl_with_every_token_and_a_lower_bound_with_fewer():
    torch.manual_seed(0)
    ref_h, pol_h, weight = torch.randn(5, 8), torch.randn(5, 8), torch.randn(11, 8)
    p, q = torch.log_softmax(ref_h @ weight.T, -1), torch.log_softmax(pol_h @ weight.T, -1)
    full = (p.exp() * (p - q)).sum(-1)  # [5]
    torch.testing.assert_close(losses.top_k_kl(pol_h, weight, *losses.top_k_distribution(ref_h, weight, 11)), full)
    for k in (1, 3, 10):
        part = losses.top_k_kl(pol_h, weight, *losses.top_k_distribution(ref_h, weight, k))
        assert (part <= full + 1e-6).all() and (part >= -1e-6).all()
    same = losses.top_k_kl(ref_h, weight, *losses.top_k_distribution(ref_h, weight, 3))
    torch.testing.assert_close(same, torch.zeros(5), atol=1e-6, rtol=0)  # no divergence from itself


def test_anchor_indices_walk_every_example_once_per_pass_and_depend_only_on_the_step():
    rows = [dpo.anchor_indices(s, 5, 2, seed=0) for s in range(5)]  # 10 draws: two passes over 5 examples
    flat = [i for r in rows for i in r]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5)) and flat[:5] != flat[5:]
    assert dpo.anchor_indices(3, 5, 2, seed=0) == rows[3] and dpo.anchor_indices(3, 5, 2, seed=1) != rows[3]


def test_dpo_anchor_starts_at_zero_kl_and_keeps_the_anchor_answers_closer(ckpt, toy_prefs, memo_set, tmp_path):
    """The anchor's KL is 0 before the first update (policy = starting model), and
    with it the policy moves less on the anchor answers than without it."""
    common_args = ("--max-steps", 6, "--lr", 3e-3)
    dpo.main(args(ckpt, toy_prefs, tmp_path / "free", *common_args))
    dpo.main(args(ckpt, toy_prefs, tmp_path / "anchored", *common_args, "--anchor-data", memo_set,
                  "--anchor-weight", 5.0, "--anchor-batch-size", 4))
    first = log(tmp_path / "anchored")[0]
    assert first["anchor/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # "loss" is DPO's own; the KL is logged apart
    config = json.loads((tmp_path / "anchored" / "train_config.json").read_text())
    assert config["anchor_stats"]["tokenize"]["kept"] == len(PROMPTS)

    tok = data.load_tokenizer(ckpt)
    examples = data.tokenize_sft(tok, data.load_instructions(memo_set), 256)[0]

    def kl_to_start(folder):  # mean KL(start || model) over the anchor answers' tokens
        import model as model_lib
        start, end = model_lib.load_model(ckpt, device="cpu"), model_lib.load_model(folder, device="cpu")
        batch = data.collate_sft(examples, tok.pad_id)
        with torch.no_grad():
            ref = losses.top_k_distribution(dpo.anchor_hidden(start, batch, "cpu")[0], start.lm_head_weight, 300)
            return float(losses.top_k_kl(dpo.anchor_hidden(end, batch, "cpu")[0], end.lm_head_weight, *ref).mean())

    assert kl_to_start(tmp_path / "anchored") < 0.5 * kl_to_start(tmp_path / "free")


def test_dpo_anchor_ckpt_is_the_model_the_kl_is_taken_from(ckpt, toy_prefs, memo_set, tmp_path):
    """With --anchor-ckpt the targets come from that model, not the starting one:
    the first step's KL (logged before the update) is KL(anchor || start)."""
    dpo.main(args(ckpt, toy_prefs, tmp_path / "moved", "--max-steps", 3, "--lr", 3e-3))
    n = len(PROMPTS)
    dpo.main(args(tmp_path / "moved", toy_prefs, tmp_path / "back", "--max-steps", 1, "--anchor-data", memo_set,
                  "--anchor-batch-size", n, "--anchor-top-k", 16, "--anchor-ckpt", ckpt))
    import model as model_lib
    tok = data.load_tokenizer(ckpt)
    batch = data.collate_sft(data.tokenize_sft(tok, data.load_instructions(memo_set), 256)[0], tok.pad_id)
    anchor, start = model_lib.load_model(ckpt, device="cpu"), model_lib.load_model(tmp_path / "moved", device="cpu")
    with torch.no_grad():
        ref = losses.top_k_distribution(dpo.anchor_hidden(anchor, batch, "cpu")[0], anchor.lm_head_weight, 16)
        expected = float(losses.top_k_kl(dpo.anchor_hidden(start, batch, "cpu")[0], start.lm_head_weight, *ref).mean())
    assert expected > 1e-3
    assert log(tmp_path / "back")[0]["anchor/kl"] == pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="--anchor-ckpt: needs --anchor-data"):
        dpo.main(args(ckpt, toy_prefs, tmp_path / "bad", "--max-steps", 1, "--anchor-ckpt", ckpt))


def test_dpo_anchor_arguments_are_checked(ckpt, toy_prefs, memo_set, tmp_path):
    for flag, value in (("--anchor-weight", -1.0), ("--anchor-batch-size", 0), ("--anchor-top-k", 0)):
        with pytest.raises(ValueError, match=f"{flag} {value}: must be"):
            dpo.main(args(ckpt, toy_prefs, tmp_path / "bad", "--max-steps", 1, "--anchor-data", memo_set, flag, value))


def test_sft_loss_falls_on_memorisable_set(ckpt, memo_set, tmp_path):
    sft.main(args(ckpt, memo_set, tmp_path / "sft", "--max-steps", 12, "--lr", 3e-3))
    rows = log(tmp_path / "sft")
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"]


class Interrupt(Exception):
    pass


def crash_after(monkeypatch, module, name, calls, nan=False):
    """Make module.name misbehave from call number `calls` on: raise, or return NaN losses."""
    real, count = getattr(module, name), {"n": 0}

    def wrapped(*a, **k):
        count["n"] += 1
        if count["n"] > calls:
            if not nan:
                raise Interrupt()
            out, metrics = real(*a, **k)
            return out * float("nan"), metrics
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return count


@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_resume_equals_uninterrupted(ckpt, toy_prefs, memo_set, tmp_path, monkeypatch, capsys, script):
    main, fn, file = (sft.main, "sft_loss", memo_set) if script == "sft" else (dpo.main, "dpo_loss", toy_prefs)
    common = ("--max-steps", 6, "--lr", 1e-3, "--grad-accum", 2, "--batch-size", 2, "--lora-rank", 0)
    main(args(ckpt, file, tmp_path / "full", *common))
    with monkeypatch.context() as m:
        crash_after(m, losses, fn, calls=7)  # dies in step 4, after the state of step 2 was saved
        with pytest.raises(Interrupt):
            main(args(ckpt, file, tmp_path / "cut", *common, "--save-every", 2))
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    count = crash_after(monkeypatch, losses, fn, calls=10**9)
    capsys.readouterr()
    main(args(ckpt, file, tmp_path / "cut", *common, "--save-every", 2, "--resume"))
    if script == "dpo":  # the reference log-probs come from the run's cache, not a new pass
        assert re.search(r"reference log-probs: (\d+) of \1 pairs cached", capsys.readouterr().out)
    assert count["n"] == 8  # steps 3..6 only, 2 micro-batches each
    full, cut = log(tmp_path / "full"), log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, cut):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == b["lr"]
    wa, wb = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_nan_stops_the_run_and_keeps_the_last_good_state(ckpt, memo_set, tmp_path, monkeypatch):
    crash_after(monkeypatch, losses, "sft_loss", calls=3, nan=True)  # 1 micro-batch per step: step 4 is NaN
    with pytest.raises(FloatingPointError, match="step 4: .* not finite"):
        sft.main(args(ckpt, memo_set, tmp_path / "nan", "--max-steps", 6, "--save-every", 2))
    state = torch.load(tmp_path / "nan" / "state" / "trainer.pt", weights_only=True)
    assert state["step"] == 2 and not (tmp_path / "nan" / "model.safetensors").exists()


def test_prompt_and_padding_labels_change_nothing(ckpt):
    tok = data.load_tokenizer(ckpt)
    import model as model_lib
    model = model_lib.load_model(ckpt, device="cpu")
    ex, _ = data.tokenize_sft(tok, [{"prompt": p, "input": "", "response": "Paris."} for p in PROMPTS[:3]], 64)
    batch = data.collate_sft(ex, tok.pad_id)
    ids, att, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    hidden = model(ids, att, return_hidden=True)

    def loss(labels):
        return losses.sft_loss(losses.response_token_logps(hidden, model.lm_head_weight, labels, mask), mask[:, 1:])[0]

    scrambled = torch.where(mask, ids, torch.randint_like(ids, 3, tok.vocab_size))  # prompt + padding labels changed
    assert torch.equal(loss(ids), loss(scrambled))
    answer_changed = ids.clone()
    answer_changed[0, ex[0]["n_prompt"]] = 5  # one trained label changed: the loss must move
    assert not torch.equal(loss(ids), loss(answer_changed))


def test_two_processes_equal_one(ckpt, toy_prefs, tmp_path):
    extra = ("--max-steps", 3, "--lr", 1e-3, "--grad-accum", 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # both on the CPU, even beside a GPU
    for n, out in ((1, "one"), (2, "two")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               str(ROOT / "dpo.py"), *args(ckpt, toy_prefs, tmp_path / out, *extra)]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    for a, b in zip(log(tmp_path / "one"), log(tmp_path / "two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/accuracies"] == pytest.approx(b["rewards/accuracies"], abs=1e-6)
    wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    assert max((wa[k] - load_file(str(Path(ckpt) / "model.safetensors"))[k]).abs().max().item() for k in wa) > 1e-4


def test_sit_mixes_n_safety_demonstrations(ckpt, memo_set, tmp_path):
    safety = tmp_path / "safety.jsonl"
    safety.write_text("".join(json.dumps({"prompt": f"harm {k}", "response": "I can't help with that."}) + "\n"
                              for k in range(10)))
    out = sft.main(args(ckpt, memo_set, tmp_path / "sit", "--max-steps", 1, "--safety-data", safety, "--n-safety", 3))
    cfg = json.loads((Path(out) / "train_config.json").read_text())
    assert cfg["data_stats"] == {"instructions": 8, "safety": 3} and cfg["tokenize_stats"]["kept"] == 11


class _Payload:
    """Unpickling this object runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("file", ["ref_logps.pt", "trainer.pt"])
def test_a_crafted_pickle_in_state_is_refused_not_run(ckpt, toy_prefs, tmp_path, file):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    (out / "state").mkdir(parents=True)
    torch.save({"key": _Payload(marker), "step": _Payload(marker)}, out / "state" / file)
    extra = ["--resume"] if file == "trainer.pt" else []
    with pytest.raises(ValueError, match=rf"state/{file}: not a"):
        dpo.main(args(ckpt, toy_prefs, out, "--max-steps", 1, *extra))
    assert not marker.exists()


def test_reference_cache_follows_the_checkpoint_weights(ckpt, toy_prefs, tmp_path, capsys):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    dpo.main(args(str(copy), toy_prefs, tmp_path / "a", "--max-steps", 1))
    before = dpo.checkpoint_fingerprint(copy)
    weights = next(copy.glob("*.safetensors"))
    state = load_file(weights)
    from safetensors.torch import save_file
    save_file({k: v + 0.01 for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    assert dpo.checkpoint_fingerprint(copy) != before
    capsys.readouterr()
    dpo.main(args(str(copy), toy_prefs, tmp_path / "a", "--max-steps", 1, "--overwrite"))
    assert "made for other data or settings; recomputing" in capsys.readouterr().out


def test_dpo_anchor_answer_tokens_cuts_each_anchor_answer(ckpt, toy_prefs, memo_set, tmp_path):
    """--anchor-answer-tokens N: the anchor reads each answer's first N tokens; N at
    least as long as every answer changes nothing, a short N changes the step."""
    examples = [{"input_ids": [1, 2, 3, 4, 5, 6], "n_prompt": 2, "index": 0},
                {"input_ids": [1, 2, 3], "n_prompt": 2, "index": 1}]
    assert [e["input_ids"] for e in dpo.cut_answers(examples, 2)] == [[1, 2, 3, 4], [1, 2, 3]]
    assert dpo.cut_answers(examples, 0) is examples
    dpo.main(args(ckpt, toy_prefs, tmp_path / "moved", "--max-steps", 3, "--lr", 3e-3))  # KL to ckpt > 0 from here
    anchored = ("--anchor-data", memo_set, "--anchor-ckpt", ckpt, "--anchor-batch-size", len(PROMPTS), "--lr", 3e-3,
                "--max-steps", 1)
    for name, extra in (("whole", ()), ("long", ("--anchor-answer-tokens", 1000)), ("short", ("--anchor-answer-tokens", 1))):
        dpo.main(args(tmp_path / "moved", toy_prefs, tmp_path / name, *anchored, *extra))
    weights = {name: load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "long", "short")}
    for key, value in weights["whole"].items():
        torch.testing.assert_close(weights["long"][key], value)
    assert any(not torch.equal(weights["short"][k], v) for k, v in weights["whole"].items())
    assert log(tmp_path / "short")[0]["anchor/kl"] != log(tmp_path / "whole")[0]["anchor/kl"]
    with pytest.raises(ValueError, match="--anchor-answer-tokens -1: must be >= 0"):
        dpo.main(args(ckpt, toy_prefs, tmp_path / "bad", "--max-steps", 1, "--anchor-data", memo_set,
                      "--anchor-answer-tokens", -1))


def test_dpo_anchor_every_n_steps_carries_n_times_the_weight(ckpt, toy_prefs, memo_set, tmp_path):
    """--anchor-every 2: the anchor runs on steps 1, 3, ... with twice its weight, so its
    first step is --anchor-weight 2's on every step (same weights after it), and the
    steps between log no anchor/kl."""
    dpo.main(args(ckpt, toy_prefs, tmp_path / "moved", "--max-steps", 3, "--lr", 3e-3))  # KL to ckpt > 0 from here
    anchored = ("--anchor-data", memo_set, "--anchor-ckpt", ckpt, "--anchor-batch-size", len(PROMPTS), "--lr", 3e-3)
    dpo.main(args(tmp_path / "moved", toy_prefs, tmp_path / "every2", "--max-steps", 2, "--anchor-every", 2,
                  *anchored))
    dpo.main(args(tmp_path / "moved", toy_prefs, tmp_path / "weight2", "--max-steps", 1, "--anchor-weight", 2.0,
                  *anchored))
    dpo.main(args(tmp_path / "moved", toy_prefs, tmp_path / "every2_first", "--max-steps", 1, "--anchor-every", 2,
                  *anchored))
    dpo.main(args(tmp_path / "moved", toy_prefs, tmp_path / "weight1", "--max-steps", 1, *anchored))
    rows = log(tmp_path / "every2")
    assert rows[0]["anchor/kl"] > 1e-3 and "anchor/kl" not in rows[1]
    weights = {name: load_file(str(tmp_path / name / "model.safetensors")) for name in ("every2_first", "weight2",
                                                                                         "weight1")}
    for key, value in weights["weight2"].items():
        torch.testing.assert_close(weights["every2_first"][key], value)
    assert any(not torch.equal(weights["weight1"][k], v) for k, v in weights["weight2"].items())  # the weight matters
    with pytest.raises(ValueError, match="--anchor-every 0: must be >= 1"):
        dpo.main(args(ckpt, toy_prefs, tmp_path / "bad", "--max-steps", 1, "--anchor-data", memo_set,
                      "--anchor-every", 0))
