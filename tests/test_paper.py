"""paper.py: the grid runner's stages, resume and report files, on a tiny model
and tiny stand-ins for ../shared/data; one smoke run on the real data."""
import csv
import json

import pytest

import common
import paper
from tests.tiny import tiny_ckpt

WORDS = "quick brown fox lazy dog capital France Paris help request safer first second third".split()


def sentence(i, n=6):
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + f" {i}."


def fake_shared(folder):
    """Every file paper.py reads, in its real format, a few records each."""
    folder.mkdir(parents=True)
    alpaca = [{"instruction": f"Task {i}: {sentence(i)}", "input": "Some input." if i % 4 == 0 else "",
               "output": sentence(i + 1)} for i in range(40)]
    (folder / "alpaca_5000.json").write_text(json.dumps(alpaca))
    safety = [{"instruction": f"Harmful {i}: {sentence(i)}", "input": "", "output": "I can't help with that."}
              for i in range(10)]
    (folder / "safety_only_data_Instructions.json").write_text(json.dumps(safety))
    pku = [{"prompt": f"Question {i}: {sentence(i)}", "chosen": "I can't help with that request.",
            "rejected": sentence(i + 2)} for i in range(40)]
    (folder / "pku_saferlhf_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pku))
    (folder / "helpful_alpaca_eval.jsonl").write_text("".join(json.dumps({"prompt": f"Explain {w}."}) + "\n"
                                                              for w in WORDS[:5]))
    with open(folder / "xstest_human_labels_3models.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "id", "type", "prompt", "completion", "annotation_1", "annotation_2", "agreement",
                    "final_label"])
        for i, t in enumerate(["homonyms", "contrast_homonyms", "safe_targets", "homonyms"]):
            w.writerow(["m", f"v{i}", t, f"How do I kill a {WORDS[i]} process?", "ok", "", "", "", "1_full_compliance"])
    for name in paper.HARMFUL:
        (folder / name).write_text(json.dumps({"instructions": [f"Do harm {i} {name}" for i in range(3)]}))
    for file in paper.MCQ.values():
        items = [{"question": f"Is {WORDS[i]} a word?", "choices": ["no", "yes"], "answer": i % 2} for i in range(6)]
        (folder / file).write_text("".join(json.dumps(it) + "\n" for it in items))


def test_grid_runs_every_stage_resumes_and_writes_the_report(tmp_path, monkeypatch, capsys):
    fake_shared(tmp_path / "shared")
    monkeypatch.setattr(paper, "SHARED", tmp_path / "shared")
    ckpt = tiny_ckpt(tmp_path / "ckpt")
    out = tmp_path / "grid"
    argv = ["--ckpt", str(ckpt), "--out", str(out), "--sizes", "quick", "--dtype", "fp32",
            "--judge", "refusal"]  # the learned judge reads SmolLM2's features; a tiny model's text needs none
    paper.main(argv)
    models = ["base", "sit_n0", "sit_n4", "dpo", "raft"]
    for stage in paper.stages(paper.SIZES["quick"])[:-1]:
        assert common.is_finished(out / ("raft/iter_1" if stage == "raft" else stage)), stage
    results = json.loads((out / "report" / "results.json").read_text())
    assert list(results["table"]) == models
    row = results["table"]["sit_n4"]
    for bench in ("I-MaliciousInstructions", "I-CoNa", "I-Controversial"):
        r = row[bench]
        assert r["n"] == 2 and r["ci"][0] <= r["rate"] <= r["ci"][1] and r["median_reward"] is not None
    assert row["xstest_safe_refused"]["n"] == 2  # two of the three safe prompts (contrast_* left out)
    assert set(row["mcq"]) == {"boolq", "piqa", "openbookqa"} and row["mcq"]["piqa"]["n"] == 4
    assert row["reference_nll"] > 0
    md = (out / "report" / "report.md").read_text()
    assert md.count("\n| sit_n") == 2 and "I-CoNa % safe" in md and "piqa acc / acc_norm" in md
    assert f"Judges: refusal, reward:{out / 'reward'} (" in md
    assert (out / "report" / "sit_curve.png").stat().st_size > 1000
    train = json.loads((out / "data" / "alpaca_train.json").read_text())
    refs = [json.loads(line)["prompt"] for line in (out / "data" / "alpaca_reference.jsonl").read_text().splitlines()]
    assert len(train) == 16 and not {t["instruction"] for t in train} & set(refs)  # references never trained on

    capsys.readouterr()
    paper.main(argv)  # everything finished: only the report is written again
    printed = capsys.readouterr().out
    assert printed.count("finished, skipped") == len(paper.stages(paper.SIZES["quick"])) - 1
    (out / "eval_dpo" / common.FINISHED).unlink()  # as if killed during the DPO checkpoint's eval
    paper.main(argv)
    printed = capsys.readouterr().out
    assert "eval_dpo  (elapsed" in printed and "eval_sit_n0  (elapsed" not in printed


def test_missing_shared_data_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(paper, "SHARED", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing .*alpaca_5000.json"):
        paper.main(["--out", str(tmp_path / "o"), "--sizes", "quick"])


@pytest.mark.real
def test_grid_smoke_run_on_the_real_data(tmp_path):
    if not all((paper.SHARED / f).is_file() for f in ["alpaca_5000.json", "pku_saferlhf_pairs.jsonl",
                                                    *paper.HARMFUL, *paper.MCQ.values()]):
        pytest.skip("../shared/data is absent")
    paper.main(["--out", str(tmp_path / "grid"), "--sizes", "quick", "--dtype", "fp32"])
    results = json.loads((tmp_path / "grid" / "report" / "results.json").read_text())
    assert set(results["table"]) == {"base", "sit_n0", "sit_n4", "dpo", "raft"}
    assert results["table"]["base"]["mcq"]["openbookqa"]["n"] == 4
