"""Experiment pipelines behind the notebooks: configs with per-profile sizes, and the steps each notebook
calls. Kept in the package (not in notebooks) so that they are tested and reusable.

- :mod:`~flatness.experiments.boolean`: notebook 01 (Zhang et al. Fig. 2, S3; EP vs the sampled prior)
- :mod:`~flatness.experiments.attack`: notebook 02 (Zhang et al. Fig. 3, S7, S19; notebook 03 re-runs it per optimizer)
- :mod:`~flatness.experiments.overtraining`: notebook 04 (Zhang et al. Fig. 5, S6, S8-S16)
- :mod:`~flatness.experiments.dynamics`: notebook 05 (Chen et al. Fig. 1, 2)
- :mod:`~flatness.experiments.correlations`: notebook 06 (Chen et al. Fig. 3, G.5, the pairwise matrix)
- :mod:`~flatness.experiments.vit`: notebook 07 (Chen et al. Fig. 4)
"""
