"""Grad-CAM maps (Captum), their overlays and galleries, and how well they localise the defect."""
