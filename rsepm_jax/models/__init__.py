"""Networks (Flax Linen) and weight conversion."""
