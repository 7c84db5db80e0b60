"""The prior over functions P(f): direct sampling (Boolean systems) and the NNGP/EP approximation.

Zhang et al. 2021, Definition 2.3 and Appendix D.
"""

from .ep import EPResult, log_prior_ep, to_log10
from .gp import log_prior
from .kernels import ArcCosineNNGPKernel, arccos_kernel, empirical_nngp_kernel
from .sampling import FunctionCounts, sample_function_counts

__all__ = [
    "sample_function_counts", "FunctionCounts",
    "arccos_kernel", "ArcCosineNNGPKernel", "empirical_nngp_kernel",
    "log_prior_ep", "EPResult", "log_prior", "to_log10",
]
