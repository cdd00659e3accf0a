"""Hydra sweeper plugin: Bayesian search with current Optuna (ask/tell around Hydra's launcher)."""
