"""Withdrawal methods other than VTW, as controls for it: which visual positions a row keeps.

VTW withdraws every visual token at K (the engine's default plan). ``method=random`` keeps a
uniform random share of each row's visual tokens (order kept, as UniPruneBench's random control)
and withdraws the rest at ``prune_layer``, exactly as VTW withdraws: caches, masks, recurrent
states and injected features of the kept positions only, original positions kept. Each row's
subset comes from a generator seeded by (``seed``, task, doc_id), so a doc keeps the same tokens
in any batch and in a rerun.

The share is ``keep_ratio``, or at matched compute (``match_withdraw_layer=K``) whatever makes the
row's decoder prefill FLOPs (``vtw_eval.cost``) equal VTW's at K for that very prompt, to the
nearest token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from vtw_eval.backends import arguments
from vtw_eval.cost import DecoderGeometry

METHODS = ("vtw", "random")


@dataclass(frozen=True)
class Method:
    """How a run withdraws: ``name`` (``vtw`` or ``random``) and, for ``random``, where and how much."""

    name: str = "vtw"
    prune_layer: int | None = None
    keep_ratio: float | None = None
    seed: int | None = None
    match_withdraw_layer: int | None = None

    @classmethod
    def from_arguments(
        cls, method, prune_layer, keep_ratio, seed, match_withdraw_layer, withdraw_layer, num_layers: int
    ) -> Method:
        """The model arguments checked together (before any request): a random subset needs either
        ``keep_ratio`` in (0, 1) or ``match_withdraw_layer`` (a K from ``prune_layer`` to L), takes
        ``prune_layer`` (default 2) instead of ``withdraw_layer``, and is never calibrated; VTW takes
        none of these."""
        name = arguments.one_of("method", method, METHODS)
        chosen = (
            ("prune_layer", prune_layer), ("keep_ratio", keep_ratio), ("seed", seed),
            ("match_withdraw_layer", match_withdraw_layer),
        )  # fmt: skip
        given = [key for key, value in chosen if value is not None]
        if name == "vtw":
            if given:
                raise ValueError(
                    f"{' and '.join(given)} choose the subset of method=random; with method=vtw (every visual token "
                    "withdrawn at withdraw_layer) they would change nothing"
                )
            return cls()
        if withdraw_layer is not None:
            raise ValueError(
                f"withdraw_layer={withdraw_layer!r} with method=random: it withdraws at prune_layer, and K is "
                "calibrated for VTW only; give prune_layer instead"
            )
        layer = arguments.integer("prune_layer", 2 if prune_layer is None else prune_layer, minimum=0)
        if layer >= num_layers:
            raise ValueError(f"prune_layer={prune_layer!r} is not accepted; use an integer from 0 to {num_layers - 1}")
        seed = arguments.integer("seed", 0 if seed is None else seed, minimum=0)
        if (keep_ratio is None) == (match_withdraw_layer is None):
            raise ValueError(
                "method=random needs one of keep_ratio (the share of each row's visual tokens it keeps, in (0, 1)) "
                "and match_withdraw_layer (keep what makes each prompt's prefill FLOPs VTW's at that K)"
            )
        if match_withdraw_layer is not None:
            match = arguments.integer("match_withdraw_layer", match_withdraw_layer, minimum=0)
            if not layer <= match <= num_layers:
                raise ValueError(
                    f"match_withdraw_layer={match_withdraw_layer!r} is not accepted; use an integer from {layer} "
                    f"(prune_layer) to {num_layers}: VTW at an earlier K saves more than withdrawing every visual "
                    "token at prune_layer"
                )
            return cls(name, layer, None, seed, match)
        ratio = arguments.non_negative_float("keep_ratio", keep_ratio)
        if not 0 < ratio < 1:
            raise ValueError(f"keep_ratio={keep_ratio!r} is not accepted; use a number between 0 and 1 (exclusive)")
        return cls(name, layer, ratio, seed)

    def keep_selector(self, geometry: DecoderGeometry) -> RandomVisualSubset | None:
        """The engine's ``KeepSelector`` for this method (None: VTW's own plan)."""
        if self.name == "vtw":
            return None
        if self.match_withdraw_layer is None:
            return RandomVisualSubset(self.seed, keep_ratio=self.keep_ratio)
        return RandomVisualSubset(
            self.seed, matched=MatchedCompute(geometry, self.prune_layer, self.match_withdraw_layer)
        )

    def record(self) -> dict:
        """What accounting records carry about the method."""
        if self.name == "vtw":
            return {"method": "vtw"}
        match = {} if self.match_withdraw_layer is None else {"match_withdraw_layer": self.match_withdraw_layer}
        return {"method": self.name, "keep_ratio": self.keep_ratio, "seed": self.seed, **match}


@dataclass(frozen=True)
class MatchedCompute:
    """How many of a prompt's visual tokens stay from ``prune_layer`` on so that its decoder
    prefill FLOPs equal VTW's at ``withdraw_layer`` (every visual token withdrawn there)."""

    geometry: DecoderGeometry
    prune_layer: int
    withdraw_layer: int

    def kept(self, num_tokens: int, num_visual: int) -> int:
        """The count whose FLOPs are nearest VTW's (they grow with what stays; a tie keeps fewer)."""
        target = self.geometry.prefill_flops(num_tokens, num_visual, self.withdraw_layer)

        def distance(kept: int) -> tuple[int, int]:
            flops = self.geometry.prefill_flops(num_tokens, num_visual - kept, self.prune_layer)
            return abs(flops - target), kept

        return min(range(num_visual + 1), key=distance)


class RandomVisualSubset:
    """``method=random``'s keep mask (a ``vtw_eval.engine.KeepSelector``): every text position,
    and of each row's ``n`` visual positions ``round(keep_ratio * n)``, or the matched count, drawn
    without replacement. ``rows`` names the current batch's requests, (task, doc_id) per row; the
    backend sets it."""

    def __init__(self, seed: int, keep_ratio: float | None = None, matched: MatchedCompute | None = None):
        self.seed, self.keep_ratio, self.matched = seed, keep_ratio, matched
        self.rows: list[tuple[str, int]] = []

    def __call__(self, visual_mask: torch.Tensor, attention_mask, hidden_states) -> torch.Tensor:
        if len(self.rows) != visual_mask.shape[0]:
            raise ValueError(
                f"method=random knows {len(self.rows)} requests for a batch of {visual_mask.shape[0]} rows"
            )
        keep = ~visual_mask
        lengths = [visual_mask.shape[1]] * len(self.rows) if attention_mask is None else attention_mask.sum(1).tolist()
        for row, (task, doc_id) in enumerate(self.rows):
            positions = visual_mask[row].nonzero()[:, 0]
            if self.matched is None:
                count = round(self.keep_ratio * len(positions))
            else:  # this prompt's own length (without padding) and visual tokens
                count = self.matched.kept(int(lengths[row]), len(positions))
            generator = torch.Generator().manual_seed(subset_seed(self.seed, task, doc_id))
            chosen = torch.randperm(len(positions), generator=generator)[:count]
            keep[row, positions[chosen.to(positions.device)]] = True
        return keep


def subset_seed(seed: int, task: str, doc_id: int) -> int:
    """A generator seed for one doc's subset, the same in every process and run (Python's own
    ``hash`` of a string differs between processes)."""
    digest = hashlib.sha256(f"{seed}/{task}/{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
