"""drn-eval with MLflow URIs: models:/m-<id>, models:/<name>/<version>, models:/<name>@<alias> and
runs:/<run id> resolve to the checkpoint artifact of the trial run that logged the model
(search/registry.py), then drn's own evaluation runs on it (drn itself knows nothing of MLflow)."""
import sys

from drn.cli import eval_main


def main(argv=None) -> int:
    from .registry import fetch_checkpoint
    return eval_main(argv, fetch=fetch_checkpoint)


if __name__ == "__main__":
    sys.exit(main())
