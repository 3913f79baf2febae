"""The README's usage example runs as written and computes what it says."""

from pathlib import Path

import torch

import rcl_kernels as rk

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_computes_the_losses_it_names():
    usage = README.read_text().split("## Use\n", 1)[1]
    block = usage.split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict = {}
    exec(compile(block, str(README), "exec"), ns)  # noqa: S102 - our own docs
    # The same losses from the float64 reference on the same inputs.
    f, y, c, counts = (ns[name] for name in ("features", "labels", "centers", "class_counts"))
    f64, c64 = f.double(), c.double()
    expected = {
        "bcl": rk.bcl_loss(f64, y, c64, temperature=0.1, backend="reference"),
        "rcl": rk.rcl_loss(f64, y, c64, counts, feature_scale=1.0, tail_margin=0.1, backend="reference"),
        "supcon": rk.supcon_loss(f64, y, temperature=0.07, base_temperature=0.07, backend="reference"),
    }
    expected["general"] = expected["bcl"]
    for name, value in expected.items():
        torch.testing.assert_close(ns[name].double(), value, rtol=1e-5, atol=1e-5, msg=name)
    prior = counts.double() / counts.sum()
    ce = torch.nn.functional.cross_entropy(ns["logits"].double() + prior.log(), y)
    torch.testing.assert_close(ns["ce"].double(), ce, rtol=1e-5, atol=1e-5)
