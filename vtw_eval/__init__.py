"""vtw_eval: Visual Tokens Withdrawal for multimodal LLMs, as lmms-eval model backends.

Kept free of heavy imports: lmms-eval imports ``vtw_eval.registry`` while it initialises.
"""

__version__ = "0.1.0"
