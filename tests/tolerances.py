"""The suite's float tolerances, each sized to the arithmetic of the comparison it serves.

Every comparison here is of float32 values computed two ways. Rounding errors are relative to the
magnitudes summed, so a tolerance is a number of float32 units in the last place (EPS = 2**-23)
of the compared values' scale: the largest |expected| value, and at least 1 (the decoder's final
norm gives hidden states of order 1, so a logit is never rounded more finely than that).

Worst seen on this project's CPU (2026-12-06, one and two torch threads, every tiny family), in
those units: engine vs naive reference 0 (the same operations on the same values); attention,
cached decoding vs recomputing 6.4, padded batch vs one prompt 5.6, eager vs sdpa 1.3; Gated
DeltaNet (Qwen3.5) cached vs recomputed 17, and about 25 on another CPU of this kind (the failure
at atol=1e-5 in issue 33), padded batch vs one prompt 50.
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps

# The same operations on the same values (the engine against the naive reference, a model against
# itself): only a matrix product's blocking may differ with its shape. 0 seen; the budget still
# allows a few roundings per layer. At the tiny models' largest logits (about 7) it is 6.7e-6.
SAME_ARITHMETIC = 8
# The same mathematics summed in another order: one query against the cache vs a whole sequence,
# a left-padded row of a batch vs the prompt alone, eager vs sdpa. 6.4 seen: about 4x that.
REORDERED = 24
# Gated DeltaNet layers: cached decoding runs the recurrent rule one token at a time, recomputing
# runs the chunked rule (64 tokens at once, through a triangular solve), and a padded row puts
# zeros inside the chunks. The state carries every earlier token's rounding forward, so the error
# grows with the prompt: 50 seen, 2.5x that (at most 1e-4 at the tiny Qwen3.5's logits, about 6).
RECURRENT = 128
# What a guard calls "different": another K, other features. Above every SAME_ARITHMETIC budget
# here by more than 10x, and far below what a change of K does to these models (1e-3 and more).
GUARD = 1e-4


def tolerance(expected: torch.Tensor | float, ulps: int) -> float:
    """``ulps`` float32 units in the last place of max(1, the largest |expected| value)."""
    scale = float(expected.detach().abs().max()) if torch.is_tensor(expected) else abs(float(expected))
    return ulps * EPS * max(1.0, scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    torch.testing.assert_close(actual, expected, atol=tolerance(expected, ulps), rtol=0)


def kl_tolerance(logits: torch.Tensor | float, ulps: int) -> float:
    """A KL divergence computed from logits each within ``ulps`` of ``logits``' scale: a log-softmax
    at most doubles a logit's error, and the KL weighs the two distributions' log-probability errors
    by probabilities summing to 1, so it is off by at most 4 logit errors."""
    return 4 * tolerance(logits, ulps)


def log_likelihood_tolerance(logits: torch.Tensor, ulps: int, tokens: int) -> float:
    """A sum of ``tokens`` log-probabilities, each a log-softmax of logits within ``ulps``."""
    return 2 * tokens * tolerance(logits, ulps)


def reordering_ulps(model) -> int:
    """RECURRENT for a model with Gated DeltaNet layers (their cached and padded arithmetic differs
    the most), else REORDERED."""
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
    return RECURRENT if "linear_attention" in layer_types else REORDERED
