"""`python -m train --config FILE [key=value ...]`: train (or resume) a run."""

from __future__ import annotations

import argparse
import logging
import sys

from train.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train a moeforge model.")
    parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from train.user_errors import run_reporting_user_errors

    def train() -> int:
        cfg = load_config(args.config, args.overrides)
        from train.launch import run

        return run(cfg)

    return run_reporting_user_errors(train)  # user errors: one line and exit codes 2-7 (train/user_errors.py)


if __name__ == "__main__":
    sys.exit(main())
