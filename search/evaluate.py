"""drn-eval with MLflow URIs: runs:/ and models:/ resolve to the trial's checkpoint artifact,
then drn's own evaluation runs on it (drn itself knows nothing of MLflow)."""
import sys

from drn.cli import eval_main


def main(argv=None) -> int:
    from .tracking import fetch_checkpoint
    return eval_main(argv, fetch=fetch_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
