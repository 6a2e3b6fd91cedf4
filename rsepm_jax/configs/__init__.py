"""Configs: demo (synthetic data), voc, coco; each `get_config(arg)` selects a variant."""
