"""Leave-one-model-out selection of the refusal judge's rules on XSTest's human labels.

    python bench/judge_rule_selection.py [--labels ../shared/data/xstest_human_labels_3models.csv] [--before f29bf70]

The rules added since commit BEFORE are candidates. For each annotated model,
rules are dropped one at a time, in order, when dropping them does not lower
agreement on the other two models; what is left is scored on the held-out
model. The candidates themselves were written after reading all three models'
disagreements, so this holds out the choice of rules, not their writing.
"""
import argparse
import csv
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as ev  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", default=str(ROOT.parent / "shared" / "data" / "xstest_human_labels_3models.csv"))
    ap.add_argument("--before", default="f29bf70", help="the commit whose eval.py holds the old rules")
    args = ap.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.before}:eval.py"], check=True,
                               capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("old_eval", f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    rows = list(csv.DictReader(open(args.labels, newline="", encoding="utf-8")))
    models = sorted({r["model"] for r in rows})
    strong, openings, premise = list(ev.STRONG), list(ev.OPENINGS), list(ev.PREMISE)
    candidates = ([("STRONG", p) for p in strong if p not in old.STRONG]
                  + [("OPENINGS", p) for p in openings if p not in old.OPENINGS and p not in strong]
                  + [("PREMISE", p) for p in premise])

    def agreement(drop):
        ev.STRONG[:] = [p for p in strong if ("STRONG", p) not in drop]
        ev.OPENINGS[:] = ev.STRONG + [p for p in openings if p not in strong and ("OPENINGS", p) not in drop]
        ev.PREMISE[:] = [p for p in premise if ("PREMISE", p) not in drop]
        hits = {m: [0, 0] for m in models}
        for r in rows:
            human = r["final_label"] != "1_full_compliance"
            hits[r["model"]][0] += human == ev.is_refusal(r["completion"])
            hits[r["model"]][1] += 1
        return {m: k / n for m, (k, n) in hits.items()}

    print("all rules:", {m: round(100 * a, 1) for m, a in agreement(set()).items()})
    for held in models:
        train, drop = [m for m in models if m != held], set()
        for c in candidates:
            with_c, without_c = agreement(drop), agreement(drop | {c})
            if sum(without_c[m] for m in train) >= sum(with_c[m] for m in train):
                drop.add(c)
        print(f"held out {held}: {len(candidates) - len(drop)} of {len(candidates)} new rules kept, "
              f"agreement {100 * agreement(drop)[held]:.1f}%")


if __name__ == "__main__":
    main()
