"""Probing, statistics and the topological derivative itself."""

from .probes import capture_states, probe_batch
from .statistics import DenseStatistic, MatrixFreeStatistic, SiteStatistic
from .topological import SiteResult, compute_site_statistics, solve_site, topological_derivative

__all__ = [
    "DenseStatistic",
    "MatrixFreeStatistic",
    "SiteResult",
    "SiteStatistic",
    "capture_states",
    "compute_site_statistics",
    "probe_batch",
    "solve_site",
    "topological_derivative",
]
