"""Evaluation: predictions on the test set and the long-tail metrics computed from them.

Groups follow the usual long-tail split by training images per class:
many (> 100), medium (20-100), few (< 20). A group's accuracy is the mean of its classes'
accuracies; it is None when the group has no class.
"""

from __future__ import annotations

import torch


def group_of(count: int) -> str:
    if count > 100:
        return "many"
    if count >= 20:
        return "medium"
    return "few"


@torch.no_grad()
def predict(model, augment, x_uint8: torch.Tensor, batch_size: int = 500,
            amp_dtype: torch.dtype | None = None,
            memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Predicted classes (on the CPU) of the uint8 images `x_uint8`, which lie on the model's
    device; one transfer back at the end."""
    was_training = model.training
    model.eval()
    preds = []
    try:
        for i in range(0, len(x_uint8), batch_size):
            xb = augment.eval_view(x_uint8[i:i + batch_size]).contiguous(memory_format=memory_format)
            with torch.autocast(xb.device.type, dtype=amp_dtype or torch.bfloat16,
                                enabled=amp_dtype is not None):
                logits = model(xb, with_contrastive=False)
            preds.append(logits.argmax(1))
    finally:
        model.train(was_training)
    return torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.long)


def compute_metrics(preds: torch.Tensor, labels: torch.Tensor, train_counts, class_names=None) -> dict:
    labels = labels.cpu().long()
    preds = preds.cpu().long()
    train_counts = [int(c) for c in train_counts]
    C = len(train_counts)
    conf = torch.zeros(C, C, dtype=torch.long)
    conf.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)
    test_counts = conf.sum(1)
    correct = conf.diag()
    per_class = []
    accs = {}
    for k in range(C):
        acc = float(correct[k]) / float(test_counts[k]) if test_counts[k] > 0 else None
        accs[k] = acc
        per_class.append({
            "class": k,
            "name": class_names[k] if class_names else str(k),
            "train_count": train_counts[k],
            "test_count": int(test_counts[k]),
            "group": group_of(train_counts[k]),
            "accuracy": acc,
        })
    present = [a for a in accs.values() if a is not None]
    out = {
        "overall_accuracy": float(correct.sum()) / max(1, len(labels)),
        "balanced_accuracy": sum(present) / len(present) if present else None,
    }
    for g in ("many", "medium", "few"):
        vals = [accs[k] for k in range(C) if group_of(train_counts[k]) == g and accs[k] is not None]
        out[g] = sum(vals) / len(vals) if vals else None
        out[f"{g}_classes"] = sum(1 for k in range(C) if group_of(train_counts[k]) == g)
    out["per_class"] = per_class
    out["confusion_matrix"] = conf.tolist()
    return out
