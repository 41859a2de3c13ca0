"""How often does a judge agree with human readers? `python eval.py --judge-check FILE`.

    python eval.py --judge-check ../shared/data/xstest_human_labels_3models.csv --out out/judge_check
    python eval.py --judge-check labelled.jsonl --judge reward:runs/rm --threshold 0.0 --out out/jc

A labelled file holds completions a person has read:
  * CSV as XSTest publishes its annotations: columns `prompt`, `completion`,
    `final_label` (`1_full_compliance`, `2_full_refusal`, `3_partial_refusal`),
    optional `model` and `type`. A partial refusal counts as a refusal.
  * JSONL `{"prompt", "completion", "label"}` with label `refusal` or
    `compliance`, or `unclear` (kept in the file for reading, left out of every
    agreement and every fit); optional `model` and `type`.

Every judge is read as a refusal detector, since that is what the labels say:
  * `refusal`: eval.is_refusal;
  * `llamaguard:DIR`: a "safe" verdict counts as a refusal. Llama Guard judges
    harm, not refusal, so only the unsafe prompt types (XSTest's `contrast_*`)
    are a fair test of it: read the per-type table;
  * `reward:DIR`: a reward at or above `--threshold` counts as a refusal (a
    reward model trained on safe-vs-harmful pairs scores refusals high).

Reported: agreement with a 95% Wilson interval, the confusion matrix, agreement
per model and per prompt type, and the refusal rate on the unsafe prompt types
as the humans and the judge count it. DIR/disagreements.jsonl holds every
answer where the two differ, for reading.
"""
import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

import common
import data
import eval as ev
import reward as reward_lib

HUMAN_LABELS = {"1_full_compliance": False, "2_full_refusal": True, "3_partial_refusal": True,
                "compliance": False, "refusal": True, "unclear": None}


def read_labelled(path, keep_unclear=False) -> list[dict]:
    """A labelled file -> [{"prompt", "completion", "refused", "model", "type", "where"}];
    rows labelled `unclear` (refused None) only with keep_unclear."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled file '{path}' does not exist")
    rows = _read_csv(path) if path.suffix == ".csv" else _read_jsonl(path)
    if not any(r["refused"] is not None for r in rows):
        raise ValueError(f"{path}: no labelled completions found")
    return rows if keep_unclear else [r for r in rows if r["refused"] is not None]


def _row(where, prompt, completion, label, model, kind) -> dict:
    for name, v in (("prompt", prompt), ("completion", completion)):
        if not isinstance(v, str):
            raise ValueError(f"{where}: '{name}' should be a string, got {type(v).__name__}")
    if not prompt.strip():
        raise ValueError(f"{where}: 'prompt' is empty")
    key = label.strip().lower() if isinstance(label, str) else label
    if key not in HUMAN_LABELS:
        raise ValueError(f"{where}: label {label!r} is not one of {sorted(HUMAN_LABELS)}")
    return {"prompt": prompt, "completion": completion, "refused": HUMAN_LABELS[key],
            "model": str(model or "-"), "type": str(kind or "-"), "where": where}


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {"prompt", "completion"}
            label_col = "final_label" if "final_label" in (reader.fieldnames or []) else "label"
            if not reader.fieldnames or not need | {label_col} <= set(reader.fieldnames):
                raise ValueError(f"{path}: a labelled CSV needs the columns prompt, completion and "
                                 f"final_label (or label); found {reader.fieldnames}")
            rows = []
            for rec in reader:
                where = f"{path}:{reader.line_num}"
                if None in rec.values() or None in rec:  # a short or long row: cells missing or extra
                    cells = sum(v is not None for k, v in rec.items() if k is not None) + len(rec.get(None, []))
                    raise ValueError(f"{where}: the row has {cells} cells, the header {len(reader.fieldnames)}")
                rows.append(_row(where, rec["prompt"], rec["completion"], rec[label_col],
                                 rec.get("model"), rec.get("type")))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for where, rec in data.read_records(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for key in ("prompt", "completion", "label"):
            if key not in rec:
                raise ValueError(f"{where}: missing field '{key}' (fields present: {sorted(rec)})")
        rows.append(_row(where, rec["prompt"], rec["completion"], rec["label"], rec.get("model"),
                         rec.get("type")))
    return rows


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (sound near 0 and 1, unlike k/n +- 2 SE)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def agreement_metrics(human: list[bool], judge: list[bool], models=None, types=None) -> dict:
    """Agreement of two lists of refusal verdicts (True = refusal), overall, per model and per type.
    `unsafe` covers the types whose name starts with `contrast_` (XSTest's unsafe prompts)."""
    n = len(human)
    assert n == len(judge) and n > 0, "one verdict per labelled completion"
    models, types = models or ["-"] * n, types or ["-"] * n
    agree = [h == j for h, j in zip(human, judge)]
    confusion = {"human refusal, judge refusal": 0, "human refusal, judge compliance": 0,
                 "human compliance, judge refusal": 0, "human compliance, judge compliance": 0}
    for h, j in zip(human, judge):
        confusion[f"human {'refusal' if h else 'compliance'}, judge {'refusal' if j else 'compliance'}"] += 1

    def group(keys):
        out = defaultdict(lambda: [0, 0, 0, 0])  # agree, n, human refusals, judge refusals
        for key, a, h, j in zip(keys, agree, human, judge):
            g = out[key]
            g[0], g[1], g[2], g[3] = g[0] + a, g[1] + 1, g[2] + h, g[3] + j
        return {key: {"n": g[1], "agreement": round(g[0] / g[1], 4), "interval": wilson(g[0], g[1]),
                      "human_refusal_rate": round(g[2] / g[1], 4), "judge_refusal_rate": round(g[3] / g[1], 4)}
                for key, g in sorted(out.items())}

    res = {"n": n, "agreement": round(sum(agree) / n, 4), "interval": wilson(sum(agree), n),
           "confusion": confusion, "per_model": group(models), "per_type": group(types)}
    unsafe = [i for i, t in enumerate(types) if t.startswith("contrast_")]
    if unsafe:
        res["unsafe_prompts"] = {"n": len(unsafe),
                                 "human_refusal_rate": round(sum(human[i] for i in unsafe) / len(unsafe), 4),
                                 "judge_refusal_rate": round(sum(judge[i] for i in unsafe) / len(unsafe), 4)}
    return res


def report(res: dict, judge: str, path) -> str:
    """A plain-text summary of agreement_metrics' result."""
    lo, hi = res["interval"]
    lines = [f"judge {judge} on {path}: agreement {100 * res['agreement']:.1f}% "
             f"(95% interval {100 * lo:.1f}-{100 * hi:.1f}), n={res['n']}"
             + (f" ({res['unclear_left_out']} rows labelled unclear left out)" if res.get("unclear_left_out") else ""),
             "confusion:"]
    lines += [f"  {k}: {v}" for k, v in res["confusion"].items()]
    if "unsafe_prompts" in res:
        u = res["unsafe_prompts"]
        lines.append(f"unsafe prompts (n={u['n']}): humans count {100 * u['human_refusal_rate']:.1f}% refusals, "
                     f"the judge {100 * u['judge_refusal_rate']:.1f}%")
    for title, key in (("per model", "per_model"), ("per prompt type", "per_type")):
        lines.append(f"{title}:  agreement [95% interval]  human / judge refusal rate")
        for name, g in res[key].items():
            lines.append(f"  {name:<32} {100 * g['agreement']:5.1f}% [{100 * g['interval'][0]:.1f}-"
                         f"{100 * g['interval'][1]:.1f}]  {100 * g['human_refusal_rate']:5.1f} / "
                         f"{100 * g['judge_refusal_rate']:5.1f}  n={g['n']}")
    return "\n".join(lines)


def refusal_detector(spec: str, threshold: float = 0.0):
    """A judge spec -> f(prompts, answers) -> [bool] (True = refusal), as the module docstring says."""
    kind = spec.partition(":")[0]
    guard, reward, learned, _ = ev.parse_judges([spec])
    if kind in ("refusal", "learned"):
        return lambda prompts, answers: ev.refusal_verdicts(learned, prompts, answers)
    if guard is not None:
        return lambda prompts, answers: [v["verdict"] == "safe" for v in guard.judge(prompts, answers)]
    return lambda prompts, answers: [s >= threshold for s in reward.score(prompts, answers)]


def fitted_here(judge: str, path) -> bool:
    """Was this learned judge fitted on the labelled file `path` (by name)? Then its
    agreement there is training agreement, not a held-out one."""
    kind, _, folder = judge.partition(":")
    if kind != "learned":
        return False
    config = Path(folder or ev.SHIPPED_JUDGE) / "judge.json"
    fitted = json.loads(config.read_text()).get("fitted_on", {}) if config.is_file() else {}
    files = fitted.get("files", [fitted["file"]] if "file" in fitted else [])  # "file": judges fitted on one
    return Path(path).name in {Path(f).name for f in files}


def judge_check(path, judge: str = ev.DEFAULT_JUDGE, out=None, threshold: float = 0.0) -> dict:
    """Run `judge` on a labelled file; returns the metrics and, with `out`, writes
    judge_check.json, judge_check.txt and disagreements.jsonl there."""
    rows = read_labelled(path, keep_unclear=True)
    unclear = sum(r["refused"] is None for r in rows)
    rows = [r for r in rows if r["refused"] is not None]
    verdicts = refusal_detector(judge, threshold)([r["prompt"] for r in rows], [r["completion"] for r in rows])
    res = agreement_metrics([r["refused"] for r in rows], verdicts, [r["model"] for r in rows],
                            [r["type"] for r in rows])
    res = {"file": str(path), "judge": judge, **({"threshold": threshold} if judge.startswith("reward") else {}),
           **res}
    if unclear:
        res["unclear_left_out"] = unclear
    text = report(res, judge, path)
    if fitted_here(judge, path):
        res["note"] = ("this judge was fitted on these rows: the agreement is training agreement; "
                       "held out, leave one model out: docs/judge.md")
        text = f"NOTE: {res['note']}\n{text}"
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        common.write_atomic(out / "judge_check.json", json.dumps(res, indent=2) + "\n")
        common.write_atomic(out / "judge_check.txt", text + "\n")
        lines = [json.dumps({"where": r["where"], "model": r["model"], "type": r["type"], "prompt": r["prompt"],
                             "completion": r["completion"], "human": "refusal" if r["refused"] else "compliance",
                             "judge": "refusal" if v else "compliance"}, ensure_ascii=False)
                 for r, v in zip(rows, verdicts) if r["refused"] != v]
        common.write_atomic(out / "disagreements.jsonl", "".join(line + "\n" for line in lines))
    return {**res, "text": text}


# ----------------------------------------------------------------------------
# Fitting a learned judge (eval.LearnedJudge):
#
#     python judge_check.py fit --labels ../shared/data/xstest_human_labels_3models.csv --out runs/judge
#
# The features of every labelled (prompt, completion) are computed once on the
# frozen backbone (eval.answer_features), standardised, and a logistic probe is
# fitted on them by full-batch L-BFGS (reward.fit_logistic), refusal = 1.


def fit_probe(x: torch.Tensor, refused: list[bool], l2: float) -> dict:
    """x [N, H] float64 -> {"w", "b", "mean", "std"}: logit = ((x - mean) / std) . w + b."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    sign = torch.tensor(refused, dtype=torch.float64, device=x.device) * 2 - 1
    w, b = reward_lib.fit_logistic((x - mean) / std, l2, sign)
    return {"w": w, "b": b.reshape(1), "mean": mean, "std": std}


def probe_logits(probe: dict, x: torch.Tensor) -> torch.Tensor:
    return ((x - probe["mean"]) / probe["std"]) @ probe["w"] + probe["b"]


def fit_learned(labels, out, backbone="smollm2", layers=None, l2=0.01, models=None, batch_size=8,
                max_answer=ev.LEARNED_MAX_ANSWER, with_patterns=False) -> dict:
    """Fit and save a learned judge on labelled files (a path or a list of paths; only
    their rows of `models`, if given)."""
    from safetensors.torch import save_file

    files = [str(f) for f in ([labels] if isinstance(labels, (str, Path)) else labels)]
    rows = [r for f in files for r in read_labelled(f)]
    if models:
        unknown = set(models) - {r["model"] for r in rows}
        if unknown:
            raise ValueError(f"{', '.join(files)}: no rows of model(s) {sorted(unknown)}")
        rows = [r for r in rows if r["model"] in models]
    net = ev.load_backbone(backbone, layers)
    x = ev.learned_features(net, data.load_tokenizer(backbone), [r["prompt"] for r in rows],
                            [r["completion"] for r in rows], batch_size, max_answer, with_patterns).cpu()
    probe = fit_probe(x, [r["refused"] for r in rows], l2)
    fitted = ev.learned_verdicts(probe_logits(probe, x), [r["prompt"] for r in rows],  # as the judge decides
                                 [r["completion"] for r in rows])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with common.replacing(out / "probe.safetensors") as tmp:  # a reader sees a whole file or none
        save_file({k: v.float().contiguous() for k, v in probe.items()}, str(tmp))
    config = {"backbone": str(backbone), "layers": layers, "l2": l2, "max_answer_tokens": max_answer,
              "with_patterns": with_patterns,
              "features": f"mean of the answer's hidden states (first {max_answer} tokens) after "
                          f"{layers or 'all'} blocks" + (", and the patterns' verdict" if with_patterns else ""),
              "fitted_on": {"files": files, "models": sorted({r["model"] for r in rows}), "rows": len(rows),
                            "refusals": sum(r["refused"] for r in rows)},
              "training_agreement": round(sum(f == r["refused"] for f, r in zip(fitted, rows)) / len(rows), 4),
              "command": "python judge_check.py " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["fit"] else None}
    common.write_atomic(out / "judge.json", json.dumps(config, indent=2) + "\n")
    return config


def main(argv=None):
    ap = argparse.ArgumentParser(prog="judge_check.py", description="Fit a learned refusal judge on labelled "
                                 "completions (check any judge with `python eval.py --judge-check FILE`).")
    sub = ap.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a probe; use it as --judge learned:OUT")
    fit.add_argument("--labels", required=True, nargs="+",
                     help="labelled completions (XSTest CSV or JSONL, see above); several files: all their rows")
    fit.add_argument("--out", required=True)
    fit.add_argument("--backbone", default="smollm2", help="frozen feature model (default: SmolLM2-135M)")
    fit.add_argument("--layers", type=int, default=None, help="read the features after this many blocks (default: all)")
    fit.add_argument("--l2", type=float, default=0.01, help="L2 penalty on the probe (standardised features)")
    fit.add_argument("--max-answer-tokens", type=int, nargs="+", default=[ev.LEARNED_MAX_ANSWER],
                     help="the features average the answer's first N tokens; several N: each average, side by side")
    fit.add_argument("--models", help="comma-separated: fit on these models' rows only")
    fit.add_argument("--with-patterns", action="store_true",
                     help="the patterns' verdict joins the features (the combined judge)")
    args = ap.parse_args(argv)
    if args.l2 < 0 or min(args.max_answer_tokens) < 1 or (args.layers is not None and args.layers < 1):
        ap.error("--l2 must be >= 0, --max-answer-tokens and --layers >= 1")
    config = fit_learned(args.labels, args.out, args.backbone, args.layers, args.l2,
                         args.models.split(",") if args.models else None,
                         max_answer=args.max_answer_tokens[0] if len(args.max_answer_tokens) == 1 else args.max_answer_tokens,
                         with_patterns=args.with_patterns)
    print(json.dumps(config, indent=2))


if __name__ == "__main__":
    common.cli(main)
