"""Leave-one-model-out selection of the refusal judge's rules on XSTest's human labels.

    python bench/judge_rule_selection.py [--labels ../shared/data/xstest_human_labels_3models.csv] [--before f29bf70]

The rules added since commit BEFORE are candidates. For each annotated model,
rules are dropped one at a time, in order, when dropping them does not lower
agreement on the other two models; what is left is scored on the held-out
model. The candidates themselves were written after reading all three models'
disagreements, so this holds out the choice of rules, not their writing.
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as ev  # noqa: E402
import judge_check  # noqa: E402


def rule_selection(rows, before="f29bf70"):
    """-> (verdicts(drop) -> one refusal verdict per row, choose(train_models) -> the rules to drop).
    The candidates are the rules of eval.py that the commit `before` lacked."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(subprocess.run(["git", "-C", str(ROOT), "show", f"{before}:eval.py"], check=True,
                               capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("old_eval", f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    strong, openings, premise = list(ev.STRONG), list(ev.OPENINGS), list(ev.PREMISE)
    candidates = ([("STRONG", p) for p in strong if p not in old.STRONG]
                  + [("OPENINGS", p) for p in openings if p not in old.OPENINGS and p not in strong]
                  + [("PREMISE", p) for p in premise])

    def verdicts(drop):
        ev.STRONG[:] = [p for p in strong if ("STRONG", p) not in drop]
        ev.OPENINGS[:] = ev.STRONG + [p for p in openings if p not in strong and ("OPENINGS", p) not in drop]
        ev.PREMISE[:] = [p for p in premise if ("PREMISE", p) not in drop]
        out = [ev.is_refusal(r["completion"]) for r in rows]
        ev.STRONG[:], ev.OPENINGS[:], ev.PREMISE[:] = strong, openings, premise
        return out

    def agreement(drop, models):
        hits = [v == r["refused"] for v, r in zip(verdicts(drop), rows)]
        return {m: sum(h for h, r in zip(hits, rows) if r["model"] == m) / sum(r["model"] == m for r in rows)
                for m in models}

    def choose(train):
        """Drop candidates one at a time, in order, when that does not lower agreement on `train`."""
        drop = set()
        for c in candidates:
            if sum(agreement(drop | {c}, train).values()) >= sum(agreement(drop, train).values()):
                drop.add(c)
        return drop

    choose.candidates = candidates
    return verdicts, choose, agreement


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", default=str(ROOT.parent / "shared" / "data" / "xstest_human_labels_3models.csv"))
    ap.add_argument("--before", default="f29bf70", help="the commit whose eval.py holds the old rules")
    args = ap.parse_args()
    rows = judge_check.read_labelled(args.labels)
    models = sorted({r["model"] for r in rows})
    _, choose, agreement = rule_selection(rows, args.before)
    print("all rules:", {m: round(100 * a, 1) for m, a in agreement(set(), models).items()})
    for held in models:
        drop = choose([m for m in models if m != held])
        print(f"held out {held}: {len(choose.candidates) - len(drop)} of {len(choose.candidates)} new rules kept, "
              f"agreement {100 * agreement(drop, [held])[held]:.1f}%")


if __name__ == "__main__":
    main()
