"""Backbones, freezing policies, losses and the LightningModule."""
