"""The README: its usage example runs as written and computes what it says; it stays a short page
for users (install near the top, links that exist, nothing outside the repository)."""

import re
from pathlib import Path

import torch

import rcl_kernels as rk

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def usage_example(text: str) -> str:
    """The first python block of the README's "## Use" section."""
    usage = text.split("\n## Use\n", 1)[1]
    return usage.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_usage_example_trains_with_bcl_and_la_ce():
    ns: dict = {}
    exec(compile(usage_example(README.read_text()), str(README), "exec"), ns)  # noqa: S102
    features, labels, centers, logits = (ns[k] for k in ("features", "labels", "centers", "logits"))
    assert features.shape == (64, 2, 64) and centers.shape == (5, 64)
    # The last step's loss, again from the float64 reference on the same tensors.
    counts = torch.tensor(ns["class_counts"], dtype=torch.float64)
    la_ce = torch.nn.functional.cross_entropy(logits.double() + (counts / counts.sum()).log(), labels)
    bcl = rk.bcl_loss(features.double(), labels, centers.double(), temperature=0.1,
                      backend="reference")
    torch.testing.assert_close(ns["loss"].double(), 2.0 * la_ce + 0.6 * bcl, rtol=1e-5, atol=1e-5)
    # The centers come from the classifier: the contrastive loss trains it too.
    assert ns["classifier"].weight.grad is not None
    assert centers.grad_fn is not None


OUTSIDE = re.compile(r"shared/|\.\./|[Ii]ssue \d+|DESIGN")
REPO_PATH = re.compile(r"`((?:rcl_kernels|csrc|bench|tests|python|examples|docs)/[\w./-]+)`")


def missing_paths(text: str) -> list[str]:
    """Repository paths named in backticks or linked that do not exist."""
    named = REPO_PATH.findall(text) + re.findall(r"\]\(([^)#]+)\)", text)
    return [path for path in named if "<" not in path and not (ROOT / path).exists()]


def test_readme_is_a_short_page_for_users():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 250
    assert lines.index("## Install") < 40
    assert lines[2] == "```bash" and lines[3].startswith("make demo") and lines[4].startswith("make test")
    assert "## Training results" in text
    assert not OUTSIDE.search(text)
    assert not missing_paths(text)
    for name in ("architecture", "kernels", "benchmarks", "harness", "gpu-status"):
        assert f"docs/{name}.md" in text


def test_docs_refer_only_to_the_repository():
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        assert not OUTSIDE.search(text), page.name
        assert not missing_paths(text), page.name
