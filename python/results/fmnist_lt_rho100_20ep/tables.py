"""Tables that `rcl_train.study` does not print, from the per-run reports kept beside study.json:
per-class test accuracy (mean ± std over seeds) with each class's training count, the accuracy of
the three rarest classes ("tail"), and the difference between the fused and the reference loss
backend for the run that was repeated with `--loss-backend reference`.

    python python/results/fmnist_lt_rho100_20ep/tables.py [DIR]   # DIR: this folder (default)

Writes DIR/tables.md and prints it.
"""

import json
import os
import statistics
import sys

RECIPES = ("LA-CE", "BCL", "BCL+RCL")


def slug(recipe):
    return recipe.lower().replace("+", "_").replace("-", "")


def load(path):
    with open(path) as f:
        return json.load(f)


def mean_std(values):
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main(root):
    study = load(os.path.join(root, "study.json"))
    reports = {}
    for recipe in RECIPES:
        for seed in study["table"][recipe]["seeds"]:
            reports[recipe, seed] = load(os.path.join(root, "runs", f"{slug(recipe)}_s{seed}", "report.json"))
    first = next(iter(reports.values()))
    classes = first["per_class"]
    counts = [c["train_count"] for c in classes]
    tail = sorted(range(len(counts)), key=lambda k: counts[k])[:3]
    lines = ["Per-class test accuracy in % (1,000 test images per class), mean ± sample std over "
             "the seeds; `n` is the class's training count after the long-tailed draw.", "",
             "| class | n | " + " | ".join(RECIPES) + " |", "|---|---|" + "---|" * len(RECIPES)]
    for k, c in enumerate(classes):
        cells = [mean_std([r["per_class"][k]["accuracy"] for (rec, _), r in reports.items() if rec == recipe])
                 for recipe in RECIPES]
        lines.append(f"| {c['name']} | {c['train_count']} | " + " | ".join(cells) + " |")
    tail_cells = []
    for recipe in RECIPES:
        per_seed = [statistics.fmean(r["per_class"][k]["accuracy"] for k in tail)
                    for (rec, _), r in reports.items() if rec == recipe]
        tail_cells.append(mean_std(per_seed))
    names = ", ".join(f"{classes[k]['name']} ({counts[k]})" for k in tail)
    lines.append(f"| **tail: {names}** | | " + " | ".join(tail_cells) + " |")

    ref_path = os.path.join(root, "runs", "bcl_rcl_s0_reference", "report.json")
    if os.path.isfile(ref_path):
        ref, fused = load(ref_path), reports["BCL+RCL", 0]
        std = study["table"]["BCL+RCL"]["balanced_accuracy"]["std"]
        rows = [("balanced", "balanced_accuracy"), ("overall", "overall_accuracy"),
                ("many", "many"), ("medium", "medium")]
        lines += ["", f"BCL+RCL, seed 0, same schedule: loss backend `{fused['loss_backend']}` "
                  f"(fused) against `{ref['loss_backend']}` (the N x M PyTorch oracle).", "",
                  "| metric | fused | reference | fused − reference |", "|---|---|---|---|"]
        for name, key in rows:
            a, b = fused[key], ref[key]
            lines.append(f"| {name} | {100 * a:.2f} | {100 * b:.2f} | {100 * (a - b):+.2f} |")
        fh = [json.loads(x) for x in open(os.path.join(root, "runs", "bcl_rcl_s0", "metrics.jsonl"))]
        rh = [json.loads(x) for x in open(os.path.join(root, "runs", "bcl_rcl_s0_reference", "metrics.jsonl"))]
        first_diff = next((i + 1 for i, (x, y) in enumerate(zip(fh, rh)) if x["loss"] != y["loss"]), None)
        lines += ["", f"Seed std of BCL+RCL's balanced accuracy: {100 * std:.2f} points. Training "
                  f"loss of epoch 1: fused {fh[0]['loss']:.6f}, reference {rh[0]['loss']:.6f}; "
                  f"the epoch losses first differ at epoch {first_diff}; "
                  f"epoch {len(fh)}: fused {fh[-1]['loss']:.6f}, reference {rh[-1]['loss']:.6f}. "
                  f"Wall time: fused {fused['wall_time_s']:.0f} s, reference {ref['wall_time_s']:.0f} s."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(root, "tables.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
