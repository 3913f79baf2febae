"""rcl-train: command-line entry point (console script `rcl-train = rcl_train.cli:main`)."""

from __future__ import annotations

import os
import sys

from .config import parse_config
from .data import DataNotFoundError
from .errors import NonFiniteError


def main(argv=None) -> int:
    cfg = parse_config(argv)  # bad flags: argparse prints the usage and exits with status 2
    from .report import summary_text
    from .train import train

    try:
        rep = train(cfg)
    except (DataNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"rcl-train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"rcl-train: error: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 alone reports
        print(summary_text(rep))
        print(f"report: {cfg.out}/report.json ({', '.join(rep['files'][1:])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
