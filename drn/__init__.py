"""drn: dynamic-routing ResNets with path diversity and consistency (Wang, Qin, Li)."""
from .config import TrainConfig, UsageError
from .cost import CostTable, measure_cost_table
from .models import ARCHS, ModelConfig, RoutedResNet, build_model
from .train import Trainer, train

__version__ = "0.1.0"
__all__ = ["ARCHS", "CostTable", "ModelConfig", "RoutedResNet", "TrainConfig", "Trainer", "UsageError",
           "build_model", "measure_cost_table", "train"]
