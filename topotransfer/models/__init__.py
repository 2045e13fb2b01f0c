"""Small reference networks of the method, built from TopoLayers."""

from .residual_cnn import ResidualCNN
from .residual_mlp import ResidualMLP

__all__ = ["ResidualCNN", "ResidualMLP"]
