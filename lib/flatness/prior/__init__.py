"""The prior over functions P(f): direct sampling (Boolean systems) and the NNGP/EP approximation.

Zhang et al. 2021, Definition 2.3 and Appendix D.
"""

from .sampling import FunctionCounts, sample_function_counts

__all__ = ["FunctionCounts", "sample_function_counts"]
