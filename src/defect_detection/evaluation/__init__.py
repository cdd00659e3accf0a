"""Metrics, threshold policies, reports and error analysis."""
