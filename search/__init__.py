"""drn-search: Ray Tune runs routed-ResNet trainings (drn.train.Trainer); an Optuna study chooses
their hyper-parameters (searcher.py) from a YAML space (space.py); results land as Parquet with
the Pareto fronts (results.py, pareto.py)."""
