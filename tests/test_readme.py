"""The README's usage example runs as written."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    usage = README.read_text().split("## Use\n", 1)[1]
    block = usage.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own docs
    assert float(namespace["loss"]) > 0 and float(namespace["ce"]) > 0
