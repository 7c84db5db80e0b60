"""flatness: loss flatness, function priors and compressed representations.

A reproducible replication of Zhang et al. 2021 ("Why flatness does and does not correlate with
generalization") and Chen et al. 2023 ("A simple connection from loss flatness to compressed neural
representations"). Submodules: ``data``, ``models``, ``losses``, ``train``, ``sharpness`` (with ``hessian``),
``compression``, ``bounds``, ``prior``, ``results``, ``stats``, ``plotting``, ``experiments``.
"""

from . import data, results, runs, stats, train  # noqa: F401  (submodules as attributes)
from ._device import default_device
from .boolean import boolean_inputs, function_to_hex, hex_to_function
from .data import binary_task, load_dataset
from .hessian import (EigenResult, HessianOperator, TraceEstimate, hessian_eigenvalues, hessian_trace,
                      hutchinson_trace, hutchpp_trace, lanczos, per_example_grad_norms_sq, power_iteration)
from .losses import cross_entropy, half_mse, sigmoid_bce, zero_one_error
from .prior import (ArcCosineNNGPKernel, EPResult, FunctionCounts, arccos_kernel, empirical_nngp_kernel, log_prior,
                    log_prior_ep, sample_function_counts, to_log10)
from .bounds import LVRBound, MLSBoundChain, NMLSBound, lvr_bound, mls_bound_chain, nmls_bound
from .compression import (adversarial_mls, local_metrics, network_log_volume, network_mls, normalized_mls,
                          top_singular_values)
from .models import (FCN, FNN, CifarResNet, LeNet5, SmallVGG, alpha_rescale, parametrized_layers, resnet50_cifar,
                     resnet_cifar)
from .results import ResultStore
from .sharpness import (AdaptiveSharpnessResult, KeskarResult, LogEigProduct, adaptive_sharpness,
                        keskar_sharpness, log_top_eig_product, relative_flatness)
from .stats import correlation
from .train import train_ensemble_to_zero_error, train_to_zero_error

__version__ = "0.1.0"

__all__ = [
    # data
    "load_dataset", "binary_task", "boolean_inputs", "function_to_hex", "hex_to_function",
    # models and losses
    "FCN", "FNN", "SmallVGG", "LeNet5", "resnet50_cifar", "CifarResNet", "resnet_cifar", "alpha_rescale",
    "parametrized_layers",
    "sigmoid_bce", "half_mse", "cross_entropy", "zero_one_error",
    # training
    "train_to_zero_error", "train_ensemble_to_zero_error",
    # flatness (Zhang et al. 2021; Chen et al. 2023)
    "keskar_sharpness", "KeskarResult", "hessian_eigenvalues", "hessian_trace", "per_example_grad_norms_sq",
    "log_top_eig_product", "LogEigProduct", "adaptive_sharpness", "AdaptiveSharpnessResult", "relative_flatness",
    "HessianOperator", "EigenResult", "TraceEstimate", "lanczos", "power_iteration", "hutchinson_trace",
    "hutchpp_trace",
    # representation compression (Chen et al. 2023) and its bounds
    "local_metrics", "top_singular_values", "adversarial_mls", "normalized_mls", "network_mls",
    "network_log_volume", "mls_bound_chain", "lvr_bound", "nmls_bound", "MLSBoundChain", "LVRBound", "NMLSBound",
    # the prior over functions
    "sample_function_counts", "FunctionCounts", "arccos_kernel", "ArcCosineNNGPKernel", "empirical_nngp_kernel",
    "log_prior_ep", "EPResult", "log_prior", "to_log10",
    # results and statistics
    "ResultStore", "correlation",
    # utilities
    "default_device",
]
