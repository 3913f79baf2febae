"""Train a small classifier with BCL's objective, LA-CE + BCL, on synthetic long-tailed data.

Ten Gaussian clusters in 32 dimensions with 500 down to 5 samples per class (imbalance 100); two
noisy views per sample. The model is an MLP backbone, a linear classifier and a projection head;
BCL's class centers are the classifier's weights passed through the head, as in BCL's code.

    python examples/train_bcl.py --steps 200
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import rcl_kernels as rk

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
parser.add_argument("--batch-size", type=int, default=128, help="samples per step (default 128)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda when available, else cpu")
args = parser.parse_args()
torch.manual_seed(0)

num_classes, dim = 10, 32
counts = [round(500 * 0.01 ** (k / (num_classes - 1))) for k in range(num_classes)]
means = 3 * torch.randn(num_classes, dim)
labels_all = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
inputs_all = means[labels_all] + torch.randn(len(labels_all), dim)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.classifier = nn.Linear(128, num_classes)
        self.head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x):                                  # x: [B, views, dim]
        h = self.backbone(x)
        logits = self.classifier(h[:, 0])                  # classify the first view
        features = F.normalize(self.head(h), dim=-1)       # [B, views, 64]
        centers = F.normalize(self.head(self.classifier.weight), dim=-1)  # [C, 64]
        return logits, features, centers


model = Net().to(args.device)
bcl = rk.BalancedContrastiveLoss(temperature=0.1)
la_ce = rk.LogitAdjustedLoss(counts, tau=1.0).to(args.device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

for step in range(1, args.steps + 1):
    index = torch.randint(len(labels_all), (args.batch_size,))
    x = inputs_all[index].unsqueeze(1) + 0.3 * torch.randn(args.batch_size, 2, dim)  # two views
    x, y = x.to(args.device), labels_all[index].to(args.device)
    logits, features, centers = model(x)
    loss = 2.0 * la_ce(logits, y) + 0.6 * bcl(features, y, centers)   # BCL's alpha and beta
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step == 1 or step % 50 == 0 or step == args.steps:
        print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)

with torch.no_grad():  # balanced accuracy on fresh samples, 100 per class
    y = torch.arange(num_classes).repeat_interleave(100)
    x = (means[y] + torch.randn(len(y), dim)).unsqueeze(1).to(args.device)
    correct = model(x)[0].argmax(1).cpu() == y
print(f"balanced accuracy {correct.float().mean().item():.3f}")
