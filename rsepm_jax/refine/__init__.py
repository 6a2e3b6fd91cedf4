"""Pseudo-mask refinement: pure array functions with no parameters (SCG, PAMR, RecurSeed, EPM)."""
