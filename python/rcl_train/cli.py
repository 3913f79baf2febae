"""rcl-train: command-line entry point (console script `rcl-train = rcl_train.cli:main`)."""

from __future__ import annotations

import os
import sys

from .config import parse_config
from .data import DataNotFoundError
from .errors import Interrupted, NonFiniteError, OutputError, error_reason


def _error(message) -> None:
    print(f"rcl-train: error: {message}", file=sys.stderr)


def main(argv=None) -> int:
    cfg = parse_config(argv)  # bad flags: argparse prints the usage and exits with status 2
    from .report import summary_text
    from .train import train

    try:
        rep = train(cfg)
    except (DataNotFoundError, FileNotFoundError, ValueError) as e:
        _error(e)
        return 2
    except NonFiniteError as e:
        _error(e)
        return 3
    except OutputError as e:
        _error(e)
        return 1
    except OSError as e:  # writing the metrics, the report or a plot
        _error(f"cannot write the run's output in {cfg.out} ({error_reason(e)})")
        return 1
    except Interrupted as e:
        _error(e)
        return 130
    except KeyboardInterrupt:  # before training began (loading the data, building the model)
        _error("interrupted before training began; no checkpoint was written.")
        return 130
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 alone reports
        print(summary_text(rep))
        print(f"report: {cfg.out}/report.json ({', '.join(rep['files'][1:])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
