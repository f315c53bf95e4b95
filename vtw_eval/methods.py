"""Withdrawal methods other than VTW, as controls for it: which visual positions a row keeps.

VTW withdraws every visual token at K (the engine's default plan). ``method=random`` keeps a
uniform random ``keep_ratio`` of each row's visual tokens (order kept, as UniPruneBench's random
control) and withdraws the rest at ``prune_layer``, exactly as VTW withdraws: caches, masks,
recurrent states and injected features of the kept positions only, original positions kept.
Each row's subset comes from a generator seeded by (``seed``, task, doc_id), so a doc keeps the
same tokens in any batch and in a rerun.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from vtw_eval.backends import arguments

METHODS = ("vtw", "random")


@dataclass(frozen=True)
class Method:
    """How a run withdraws: ``name`` (``vtw`` or ``random``) and, for ``random``, where and how much."""

    name: str = "vtw"
    prune_layer: int | None = None
    keep_ratio: float | None = None
    seed: int | None = None

    @classmethod
    def from_arguments(cls, method, prune_layer, keep_ratio, seed, withdraw_layer, num_layers: int) -> Method:
        """The model arguments checked together (before any work): a random subset needs a
        ``keep_ratio`` in (0, 1), takes ``prune_layer`` (default 2) instead of ``withdraw_layer``,
        and is never calibrated; VTW takes none of the three."""
        name = arguments.one_of("method", method, METHODS)
        chosen = (("prune_layer", prune_layer), ("keep_ratio", keep_ratio), ("seed", seed))
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
        if keep_ratio is None:
            raise ValueError(
                "method=random needs keep_ratio: the share of each row's visual tokens it keeps, in (0, 1)"
            )
        ratio = arguments.non_negative_float("keep_ratio", keep_ratio)
        if not 0 < ratio < 1:
            raise ValueError(f"keep_ratio={keep_ratio!r} is not accepted; use a number between 0 and 1 (exclusive)")
        return cls(name, layer, ratio, arguments.integer("seed", 0 if seed is None else seed, minimum=0))

    def keep_selector(self) -> RandomVisualSubset | None:
        return RandomVisualSubset(self.keep_ratio, self.seed) if self.name == "random" else None

    def record(self) -> dict:
        """What accounting records carry about the method."""
        return {"method": self.name} | (
            {} if self.name == "vtw" else {"keep_ratio": self.keep_ratio, "seed": self.seed}
        )


class RandomVisualSubset:
    """``method=random``'s keep mask (a ``vtw_eval.engine.KeepSelector``): every text position,
    and ``round(keep_ratio * n)`` of each row's ``n`` visual positions, drawn without replacement.
    ``rows`` names the current batch's requests, (task, doc_id) per row; the backend sets it."""

    def __init__(self, keep_ratio: float, seed: int):
        self.keep_ratio, self.seed = keep_ratio, seed
        self.rows: list[tuple[str, int]] = []

    def __call__(self, visual_mask: torch.Tensor, attention_mask, hidden_states) -> torch.Tensor:
        if len(self.rows) != visual_mask.shape[0]:
            raise ValueError(
                f"method=random knows {len(self.rows)} requests for a batch of {visual_mask.shape[0]} rows"
            )
        keep = ~visual_mask
        for row, (task, doc_id) in enumerate(self.rows):
            positions = visual_mask[row].nonzero()[:, 0]
            generator = torch.Generator().manual_seed(subset_seed(self.seed, task, doc_id))
            chosen = torch.randperm(len(positions), generator=generator)[: round(self.keep_ratio * len(positions))]
            keep[row, positions[chosen.to(positions.device)]] = True
        return keep


def subset_seed(seed: int, task: str, doc_id: int) -> int:
    """A generator seed for one doc's subset, the same in every process and run (Python's own
    ``hash`` of a string differs between processes)."""
    digest = hashlib.sha256(f"{seed}/{task}/{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
