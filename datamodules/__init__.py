"""Data for class-incremental segmentation: tasks, splits, label remapping, datasets, the datamodule."""
