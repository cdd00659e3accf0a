"""Data layer: records from disk layouts, splits, cached tensors, the Lightning datamodule."""
