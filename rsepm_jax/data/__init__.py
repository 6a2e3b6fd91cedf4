"""Dataset sources, grain transforms and input pipelines."""
