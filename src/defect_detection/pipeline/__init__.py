"""Orchestration of one job each (fit, evaluate, predict, explain, export, promote, compare):
below the API, above the parts."""
