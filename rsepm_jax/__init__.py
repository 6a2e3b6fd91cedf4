"""rsepm_jax: RecurSeed + EdgePredictMix weakly-supervised semantic segmentation in JAX/Flax."""
