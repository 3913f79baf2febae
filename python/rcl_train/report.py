"""The run's report: report.json, training-curve and confusion-matrix PNGs, and a printed summary."""

from __future__ import annotations

import json
import os


def build_report(final: dict, cfg, history: list[dict], wall_time: float, extra: dict | None = None) -> dict:
    rep = {k: final[k] for k in ("overall_accuracy", "balanced_accuracy", "many", "medium", "few")}
    rep["group_sizes"] = {g: final[f"{g}_classes"] for g in ("many", "medium", "few")}
    rep["per_class"] = final["per_class"]
    rep["confusion_matrix"] = final["confusion_matrix"]
    rep["config"] = cfg.to_dict()
    rep["wall_time_s"] = wall_time
    full = [r for r in history if "epoch_time_s" in r and not r.get("resumed_mid_epoch")]
    epoch_times = [r["epoch_time_s"] for r in full]
    rep["mean_epoch_time_s"] = sum(epoch_times) / len(epoch_times) if epoch_times else None
    # training throughput over the whole epochs (evaluation excluded) and the mean step split
    images = sum(r["images_per_s"] * r["epoch_time_s"] for r in full if r.get("images_per_s"))
    rep["images_per_s"] = images / sum(epoch_times) if epoch_times and images else None
    splits = [r["step_ms"] for r in full if r.get("step_ms")]
    rep["step_ms"] = ({k: sum(s[k] for s in splits) / len(splits) for k in splits[0]}
                      if splits else None)
    rep["epochs_done"] = len(history)
    if extra:
        rep.update(extra)
    return rep


def _fmt(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def summary_text(rep: dict) -> str:
    cfg = rep["config"]
    sizes = rep.get("group_sizes", {})
    lines = [
        f"== rcl-train report: {cfg['dataset']} rho={cfg['imbalance']:g}, loss LA-CE + {cfg['loss']} "
        f"(backend {cfg['loss_backend']}), seed {cfg['seed']} ==",
        f"overall accuracy   {_fmt(rep['overall_accuracy'])}",
        f"balanced accuracy  {_fmt(rep['balanced_accuracy'])}",
        f"many   (>100, {sizes.get('many', '?')} classes) {_fmt(rep['many'])}",
        f"medium (20-100, {sizes.get('medium', '?')} classes) {_fmt(rep['medium'])}",
        f"few    (<20, {sizes.get('few', '?')} classes) {_fmt(rep['few'])}",
    ]
    if len(rep["per_class"]) <= 20:
        lines.append("per class: " + ", ".join(
            f"{p['name']} ({p['train_count']}) {_fmt(p['accuracy'])}" for p in rep["per_class"]))
    t = f"wall time {rep['wall_time_s']:.1f} s"
    if rep.get("mean_epoch_time_s"):
        t += f", {rep['mean_epoch_time_s']:.1f} s per epoch, {rep['images_per_s']:.0f} images/s"
    if rep.get("step_ms"):
        t += "; per step " + ", ".join(f"{k} {v:.1f}" for k, v in rep["step_ms"].items()) + " ms"
    lines.append(t)
    return "\n".join(lines)


def plot_curves(path: str, history: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("loss", "total"), ("ce", "LA-CE"), ("con", "contrastive")):
        if any(key in r for r in history):
            axes[0].plot(epochs, [r.get(key, float("nan")) for r in history], marker="o", label=label)
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(epochs, [r.get("lr", float("nan")) for r in history], marker="o")
    axes[1].set_title("learning rate (epoch mean)")
    for key, label in (("test_overall_accuracy", "overall"), ("test_balanced_accuracy", "balanced"),
                       ("test_many", "many"), ("test_medium", "medium"), ("test_few", "few")):
        ys = [r.get(key) for r in history]
        if any(y is not None for y in ys):
            axes[2].plot(epochs, [float("nan") if y is None else y for y in ys], marker="o", label=label)
    axes[2].set_title("test accuracy")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(path: str, confusion: list[list[int]], class_names: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    C = len(cm)
    size = min(14, 3 + 0.45 * C)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if C <= 20:
        ax.set_xticks(range(C), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(C), class_names, fontsize=8)
        for i in range(C):
            for j in range(C):
                if norm[i, j] >= 0.01:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted (classes ordered head to tail)")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows normalized)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: str, rep: dict, history: list[dict], class_names: list[str],
                 plots: bool = True) -> list[str]:
    """Write report.json (and the PNGs when `plots`); return the names of the files written."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(rep, f, indent=2)
    written = ["report.json"]
    if plots:
        if history:
            plot_curves(os.path.join(out_dir, "curves.png"), history)
            written.append("curves.png")
        plot_confusion(os.path.join(out_dir, "confusion.png"), rep["confusion_matrix"], class_names)
        written.append("confusion.png")
    return written
