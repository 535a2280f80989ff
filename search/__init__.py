"""drn-search: Ray Tune runs routed-ResNet trainings (drn.train.Trainer); an Optuna study chooses
their hyper-parameters (searcher.py) from a YAML space (space.py); results land as Parquet with
the Pareto fronts (results.py, pareto.py).

The Python API (README, "Operating a search"), the command line's own pieces:

    from search import SearchConfig, resumed, run_search, status
    cfg = SearchConfig(target_flops=["50%"], arch="resnet20", num_samples=8)   # drn-search's flags, by field
    outcome = run_search(cfg)           # prints the summary; outcome.summary is --json's object
    outcome.exit_code                   # drn-search's exit code: 0 only with a feasible model per target
    status(cfg.name, cfg.storage)       # drn-search status --json's object
    run_search(resumed(cfg.name, {"num_samples": 12}), resume=True)   # --resume NAME --num-samples 12
"""
__all__ = ["SearchConfig", "Outcome", "resumed", "run_search", "status"]


def __getattr__(name: str):
    # lazy: Ray's trial workers import search.trainable, which should not pull in the driver's modules
    if name == "SearchConfig":
        from .config import SearchConfig
        return SearchConfig
    if name in ("Outcome", "run_search", "resumed"):
        from . import cli
        return cli.resumed_config if name == "resumed" else getattr(cli, name)
    if name == "status":
        from .monitor import read
        return read
    raise AttributeError(f"module 'search' has no attribute {name!r}")
