"""Experiment pipelines behind the notebooks: configs with per-profile sizes, and the steps each notebook
calls. Kept in the package (not in notebooks) so that they are tested and reusable.
:mod:`~flatness.experiments.boolean` (notebook 01), :mod:`~flatness.experiments.attack` (notebook 02)."""
