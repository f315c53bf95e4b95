"""Withdrawal methods other than VTW, as controls for it: which visual positions a row keeps.

VTW withdraws every visual token at K (the engine's default plan). ``method=random`` keeps a
uniform random share of each row's visual tokens (order kept, as UniPruneBench's random control)
and withdraws the rest at ``prune_layer``, exactly as VTW withdraws: caches, masks, recurrent
states and injected features of the kept positions only, original positions kept. Each row's
subset comes from a generator seeded by (``seed``, task, doc_id), so a doc keeps the same tokens
in any batch and in a rerun. ``method=fastv`` keeps the visual tokens the last prompt position
attends to most in layer ``prune_layer - 1`` (head mean), recomputed for that one query from the
layer's own projections whatever attention kernel runs (FastV, arXiv 2403.06764).

The share is ``keep_ratio``, or at matched compute (``match_withdraw_layer=K``) whatever makes the
row's decoder prefill FLOPs (``vtw_eval.cost``) equal VTW's at K for that very prompt, to the
nearest token.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass

import torch
from torch import nn

from vtw_eval.architecture import ATTENTION_LAYER_TYPES, QUERY_KEY_RECIPES, QueryKeyRecipe, layer_types
from vtw_eval.backends import arguments
from vtw_eval.cost import DecoderGeometry

METHODS = ("vtw", "random", "fastv")


@dataclass(frozen=True)
class Method:
    """How a run withdraws: ``name`` (``vtw``, ``random`` or ``fastv``) and, for the controls, where
    and how much."""

    name: str = "vtw"
    prune_layer: int | None = None
    keep_ratio: float | None = None
    seed: int | None = None
    match_withdraw_layer: int | None = None
    recipe: QueryKeyRecipe | None = None  # fastv: how the scoring layer makes queries and keys
    softcap: float | None = None  # fastv: the text model's attention logit soft-capping, if any

    @classmethod
    def from_arguments(
        cls, method, prune_layer, keep_ratio, seed, match_withdraw_layer, withdraw_layer, text_config
    ) -> Method:
        """The model arguments checked together against the checkpoint's text config (before the
        model loads): a subset needs either ``keep_ratio`` in (0, 1) or ``match_withdraw_layer`` (a K
        from ``prune_layer`` to L), takes ``prune_layer`` (default 2) instead of ``withdraw_layer``,
        and is never calibrated; VTW takes none of these. ``fastv`` ranks by layer ``prune_layer - 1``,
        which must be an attention layer of a text model whose queries and keys it knows."""
        num_layers = text_config.num_hidden_layers
        name = arguments.one_of("method", method, METHODS)
        chosen = (
            ("prune_layer", prune_layer), ("keep_ratio", keep_ratio), ("seed", seed),
            ("match_withdraw_layer", match_withdraw_layer),
        )  # fmt: skip
        given = [key for key, value in chosen if value is not None]
        if name == "vtw":
            if given:
                raise ValueError(
                    f"{' and '.join(given)} choose the subset of method=random or fastv; with method=vtw (every "
                    "visual token withdrawn at withdraw_layer) they would change nothing"
                )
            return cls()
        if withdraw_layer is not None:
            raise ValueError(
                f"withdraw_layer={withdraw_layer!r} with method={name}: it withdraws at prune_layer, and K is "
                "calibrated for VTW only; give prune_layer instead"
            )
        layer = arguments.integer("prune_layer", 2 if prune_layer is None else prune_layer, minimum=0)
        if layer >= num_layers:
            raise ValueError(f"prune_layer={prune_layer!r} is not accepted; use an integer from 0 to {num_layers - 1}")
        recipe = softcap = None
        if name == "random":
            seed = arguments.integer("seed", 0 if seed is None else seed, minimum=0)
        elif seed is not None:
            raise ValueError(f"seed={seed!r} with method=fastv: its subset is ranked by attention, not drawn")
        else:
            recipe, softcap = fastv_scoring(text_config, layer)
        if (keep_ratio is None) == (match_withdraw_layer is None):
            raise ValueError(
                f"method={name} needs one of keep_ratio (the share of each row's visual tokens it keeps, in (0, 1)) "
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
            return cls(name, layer, None, seed, match, recipe, softcap)
        ratio = arguments.non_negative_float("keep_ratio", keep_ratio)
        if not 0 < ratio < 1:
            raise ValueError(f"keep_ratio={keep_ratio!r} is not accepted; use a number between 0 and 1 (exclusive)")
        return cls(name, layer, ratio, seed, None, recipe, softcap)

    def keep_selector(self, geometry: DecoderGeometry) -> RandomVisualSubset | AttentionRankedSubset | None:
        """The engine's ``KeepSelector`` for this method (None: VTW's own plan)."""
        if self.name == "vtw":
            return None
        matched = self.match_withdraw_layer
        count = VisualCount(
            self.keep_ratio, None if matched is None else MatchedCompute(geometry, self.prune_layer, matched)
        )
        if self.name == "random":
            return RandomVisualSubset(self.seed, count)
        return AttentionRankedSubset(self.prune_layer - 1, self.recipe, count, self.softcap)

    def record(self) -> dict:
        """What accounting records carry about the method."""
        if self.name == "vtw":
            return {"method": "vtw"}
        match = {} if self.match_withdraw_layer is None else {"match_withdraw_layer": self.match_withdraw_layer}
        seed = {} if self.seed is None else {"seed": self.seed}
        return {"method": self.name, "prune_layer": self.prune_layer, "keep_ratio": self.keep_ratio, **seed, **match}


def fastv_scoring(text_config, prune_layer: int) -> tuple[QueryKeyRecipe, float | None]:
    """FastV's scoring layer checked against the checkpoint: layer ``prune_layer - 1`` must exist, be
    an attention layer, and belong to a text model whose queries and keys vtw_eval knows how to
    recompute."""
    model_type = text_config.model_type
    if model_type not in QUERY_KEY_RECIPES:
        raise ValueError(
            f"method=fastv does not know how a {model_type!r} text model makes its queries and keys; it knows "
            f"{sorted(QUERY_KEY_RECIPES)}"
        )
    kinds = layer_types(text_config)
    attention_layers = [index + 1 for index, kind in enumerate(kinds) if kind in ATTENTION_LAYER_TYPES]
    if prune_layer == 0 or kinds[prune_layer - 1] not in ATTENTION_LAYER_TYPES:
        what = (
            "there is no layer before it"
            if prune_layer == 0
            else f"layer {prune_layer - 1} is {kinds[prune_layer - 1]}"
        )
        usable = [layer for layer in attention_layers if layer < len(kinds)]
        raise ValueError(
            f"prune_layer={prune_layer} with method=fastv: it ranks by the attention of layer prune_layer - 1, and "
            f"{what}; prune_layer values with an attention layer before them: {usable or 'none in this model'}"
        )
    return QUERY_KEY_RECIPES[model_type], getattr(text_config, "attn_logit_softcapping", None)


@dataclass(frozen=True)
class VisualCount:
    """How many of a row's visual tokens stay: ``round(keep_ratio * n)``, or the matched count."""

    keep_ratio: float | None
    matched: MatchedCompute | None = None

    def __call__(self, prompt_length: int, num_visual: int) -> int:
        if self.matched is None:
            return round(self.keep_ratio * num_visual)
        return self.matched.kept(prompt_length, num_visual)  # this prompt's own length and visual tokens


def _prompt_lengths(visual_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """Each row's prompt length without its padding."""
    if attention_mask is None:
        return [visual_mask.shape[1]] * visual_mask.shape[0]
    return [int(length) for length in attention_mask.sum(1).tolist()]


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
    """``method=random``'s keep mask (a ``vtw_eval.engine.KeepSelector``): every text position, and
    ``count`` of each row's visual positions, drawn without replacement. ``rows`` names the current
    batch's requests, (task, doc_id) per row; the backend sets it."""

    def __init__(self, seed: int, count: VisualCount):
        self.seed, self.count = seed, count
        self.rows: list[tuple[str, int]] = []

    def __call__(self, visual_mask: torch.Tensor, attention_mask, hidden_states) -> torch.Tensor:
        if len(self.rows) != visual_mask.shape[0]:
            raise ValueError(
                f"method=random knows {len(self.rows)} requests for a batch of {visual_mask.shape[0]} rows"
            )
        keep = ~visual_mask
        for row, ((task, doc_id), length) in enumerate(zip(self.rows, _prompt_lengths(visual_mask, attention_mask))):
            positions = visual_mask[row].nonzero()[:, 0]
            generator = torch.Generator().manual_seed(subset_seed(self.seed, task, doc_id))
            chosen = torch.randperm(len(positions), generator=generator)[: self.count(length, len(positions))]
            keep[row, positions[chosen.to(positions.device)]] = True
        return keep


class AttentionRankedSubset:
    """``method=fastv``'s keep mask (a ``vtw_eval.engine.KeepSelector`` and ``AttentionObserver``):
    every text position, and the ``count`` visual positions of each row that the last prompt
    position attends to most in decoder layer ``attention_layer``, averaged over heads (ties: the
    earlier position). ``scores`` holds the current prefill's weights, (batch, prompt_length), until
    the subset is chosen from them; then they are ``used_scores``."""

    def __init__(self, attention_layer: int, recipe: QueryKeyRecipe, count: VisualCount, softcap: float | None = None):
        self.attention_layer, self.recipe, self.count, self.softcap = attention_layer, recipe, count, softcap
        self.scores: torch.Tensor | None = None
        self.used_scores: torch.Tensor | None = None
        self.rows: list[tuple[str, int]] = []  # set by the backend as for every method; not needed here

    def observe_attention(self, attention: nn.Module, inputs: dict) -> None:
        self.scores = last_query_attention(
            attention, inputs["hidden_states"], inputs["position_embeddings"], inputs.get("attention_mask"),
            self.recipe, self.softcap, inputs.get("position_ids"),
        )  # fmt: skip

    def __call__(self, visual_mask: torch.Tensor, attention_mask, hidden_states) -> torch.Tensor:
        if self.scores is None or self.scores.shape != visual_mask.shape:
            raise RuntimeError(f"method=fastv has no attention of layer {self.attention_layer} for this prefill")
        # used once: a later prefill whose scoring hook did not run must not reuse them
        self.used_scores, self.scores = self.scores, None
        scores = self.used_scores.to(visual_mask.device)
        keep = ~visual_mask
        for row, length in enumerate(_prompt_lengths(visual_mask, attention_mask)):
            positions = visual_mask[row].nonzero()[:, 0]
            count = self.count(length, len(positions))
            # stable sort: equal weights keep the earlier position first
            order = torch.sort(scores[row, positions], descending=True, stable=True).indices[:count]
            keep[row, positions[order]] = True
        return keep


def last_query_attention(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    recipe: QueryKeyRecipe,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, keys): the attention weights of the last position's query in ``attention`` (a
    transformers attention module, given its own inputs), averaged over heads, as eager attention
    computes them, whichever kernel the model runs. Only that query is projected. ``position_ids``
    (batch, length) are needed where queries are scaled by their position."""
    batch, length, _ = hidden_states.shape
    head_dim = attention.head_dim
    query = attention.q_proj(hidden_states[:, -1:])
    if recipe.gated_queries:  # each head's query, then its gate
        query = query.view(batch, 1, -1, 2 * head_dim)[..., :head_dim]
    query = query.reshape(batch, 1, -1, head_dim)
    key = attention.k_proj(hidden_states).view(batch, length, -1, head_dim)
    if recipe.query_key_norms:
        query, key = attention.q_norm(query), attention.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    # the family's own rotary function, from the module that defines its attention class
    rotary = importlib.import_module(type(attention).__module__).apply_rotary_pos_emb
    cos, sin = position_embeddings
    query, _ = rotary(query, query, cos[:, -1:], sin[:, -1:])
    _, key = rotary(key, key, cos, sin)
    if recipe.position_scaled_queries:
        rope = attention.config.rope_parameters
        periods = torch.floor(position_ids[:, -1:] / rope["original_max_position_embeddings"])
        scale = 1 + rope["llama_4_scaling_beta"] * torch.log(1 + periods)  # as the model computes it
        query = query * scale[:, None, :, None].to(query.dtype)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query heads
    logits = torch.matmul(query, key.transpose(2, 3)) * attention.scaling  # (batch, heads, 1, keys)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None:
        last_row = attention_mask[:, None, None, :] if attention_mask.dim() == 2 else attention_mask[..., -1:, :]
        if last_row.dtype == torch.bool or attention_mask.dim() == 2:
            logits = logits.masked_fill(~last_row.bool(), float("-inf"))
        else:
            logits = logits + last_row
    return torch.softmax(logits, dim=-1, dtype=torch.float32).mean(dim=1)[:, 0]


def subset_seed(seed: int, task: str, doc_id: int) -> int:
    """A generator seed for one doc's subset, the same in every process and run (Python's own
    ``hash`` of a string differs between processes)."""
    digest = hashlib.sha256(f"{seed}/{task}/{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
