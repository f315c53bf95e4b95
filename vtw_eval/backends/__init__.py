"""lmms-eval model backends: thin adapters from lmms-eval requests to the withdrawal engine."""
