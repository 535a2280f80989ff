"""The measuring helpers of bench/ that BENCHMARKS.md's conclusions rest on."""
import pytest
import torch

from bench.route_oracle import auc, probe_auc


def test_auc_counts_pairs_and_ties():
    label = torch.tensor([True, True, False, False])
    assert auc(label, torch.tensor([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert auc(label, torch.tensor([0.1, 0.2, 0.9, 0.8])) == 0.0
    assert auc(label, torch.tensor([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert auc(label, torch.tensor([0.9, 0.1, 0.5, 0.5])) == 0.5   # one pair won, one lost, two ties


def test_probe_finds_a_linear_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(600, 16, generator=g)
    signal = z[:, 3] - 0.5 * z[:, 7] > 0.3
    assert probe_auc(z, signal) > 0.95
    noise = torch.rand(600, generator=g) < 0.3
    assert abs(probe_auc(z, noise) - 0.5) < 0.08


@pytest.mark.slow
def test_a_sqlite_mlflow_server_holds_eight_writers_losing_nothing():
    """cluster.yaml's MLflow store (a server on sqlite), eight processes logging at once (a trial per GPU
    worker): no call fails, and every value logged is read back (bench/mlflow_load.py runs it a minute)."""
    from bench.mlflow_load import load
    result = load(writers=8, seconds=10)
    assert result["calls"] > 80 and result["errors"] == 0 and result["lost"] == 0, result
