"""What a decoder costs, with and without visual tokens withdrawn before layer K, and what the
whole LLaVA-1.5, Qwen2-VL, Qwen3-VL or Qwen3.5 forward costs around it.

Conventions (papers count three incompatible ways; this is VTW's own, "true FLOPs"):
- 2 FLOPs per multiply-add, matrix products only (norms, activations and softmax are left out,
  as FLOP counters do); the decoder figures (``prefill_flops``) are the decoder layers only, the
  figure papers report; the whole-forward figures (``WholeModel``) add the vision tower, the
  projector and the LM head, which VTW does not change;
- per layer and token: q/k/v/o projections 2*d*(2*q + 2*kv) with q = heads*head_dim and
  kv = kv_heads*head_dim (grouped-query heads included), gated MLP 2*3*d*m;
- attention 2*2*q FLOPs per (query, key) pair (scores and weighted values); prefill counts the full
  n x n matrix, as calflops does for VTW's figures (causal kernels compute about half);
- for LLaVA-1.5-7B (d=4096, m=11008, 32 layers) and 651 prompt tokens this gives 8.65 TFLOPs,
  and 4.81 TFLOPs with K=16 (VTW reports 8.48 and 4.68 with calflops);
- Qwen3.5's attention layers: q_proj also yields an output gate (2*d*2*q); a mixture-of-experts
  MLP: the router 2*d*E, the active experts k*2*3*d*m_e, a shared expert and its gate;
- a Gated DeltaNet (``linear_attention``) layer: per token its projections (q, k, v, the gate z,
  the rates a and b, out), and the depthwise convolution 2*kernel*channels; in prefill the
  chunked delta rule (``LinearAttention.prefill_mixing_flops``: chunks of 64, its matrix products
  as transformers runs them), in decoding the recurrent one, 6*dk*dv per value head and token.
- Gemma 4: full layers with their own head width and KV heads (values that are the keys: no v
  projection), a per-layer input gated into every layer (2*2*d*p per token), experts beside the
  MLP; KV-shared layers without k/v projections or cache, attending to their producer's keys (all
  of them when it is before K: the withdrawn are masked, not skipped), on the last position only in
  ``generate``'s prefill (``every_position`` for forwards that keep every logit).
KV-cache bytes: keys and values, kv_heads*head_dim each per token and attention layer, at the
cache dtype (a sliding-window layer caches its last window - 1 tokens; a decoding step attends to
those and itself); a recurrent layer's states (convolution inputs, a float32 dk x dv state per value
head) have a fixed size, so withdrawal saves none of them.
Whole forward (LLaVA-1.5: a CLIP or SigLIP ViT runs once per image; its patch tokens, without
CLIP's class token, go through a two-layer MLP projector): per image the patch convolution
2*patches*(channels*patch^2)*h and, per tower layer over t tokens, 8*t*h^2 + 4*t*h*m + 4*t^2*h
(all tower layers run: transformers asks for every hidden state); the projector 2*v*(h*d + d*d)
for v visual tokens; the LM head 2*d*vocab for the one position generate keeps in prefill
(``logits_to_keep=1``); the embedding lookup costs none.
Whole forward (Qwen2-VL: its ViT runs once per image over n = v*s^2 patches, s the spatial merge,
attention within the image; the merger's MLP maps each s x s group of patches to one visual
token): per image the patch convolution 2*n*(channels*temporal_patch*patch^2)*e, per block
8*n*e^2 + 4*n*e*m + 4*n^2*e, the merger 2*(n/s^2)*(s^2*e)^2 + 2*(n/s^2)*(s^2*e)*d; the LM head
as above. Qwen3-VL and Qwen3.5 the same (their ViT MLP is e -> m -> e), Qwen3-VL with one more
merger per DeepStack block. Images only: a video's patch grid (frames) is not known from its
token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vtw_eval import architecture


@dataclass(frozen=True)
class LinearAttention:
    """A Gated DeltaNet layer's token mixer (Qwen3.5's ``linear_attention``): value heads of
    ``value_head_dim``, key heads of ``key_head_dim`` (each serving several value heads), a depthwise
    causal convolution of ``conv_kernel`` over q, k and v, and the delta rule over chunks."""

    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    chunk_size: int = 64  # the chunked delta rule's chunk (transformers' and flash-linear-attention's)

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_head_dim + self.value_heads * self.value_head_dim

    def token_flops(self, hidden_size: int) -> int:
        """One token's projections: q, k, v; the output gate z; the decay and update rates a, b; out."""
        d, values = hidden_size, self.value_heads * self.value_head_dim
        return 2 * d * (self.conv_channels + values + 2 * self.value_heads) + 2 * values * d

    def prefill_mixing_flops(self, num_tokens: int) -> int:
        """The depthwise causal convolution over ``num_tokens`` (it computes kernel - 1 more outputs
        than it keeps), then the chunked delta rule (``num_tokens`` padded to whole chunks of C): per
        value head and chunk, k_beta k^T and q k^T (2 * 2 C^2 dk), the intra-chunk output (2 C^2 dv),
        reading the state twice and writing it once (3 * 2 C dk dv). The two unit-triangular solves
        per chunk (C^2 (dk + dv)) are not counted, as FLOP counters do not count them."""
        c, dk, dv = self.chunk_size, self.key_head_dim, self.value_head_dim
        convolution = 2 * self.conv_kernel * self.conv_channels * (num_tokens + self.conv_kernel - 1)
        chunks = -(-num_tokens // c)
        return convolution + self.value_heads * chunks * (4 * c * c * dk + 2 * c * c * dv + 6 * c * dk * dv)

    def decode_mixing_flops(self) -> int:
        """One token: the convolution over its last ``conv_kernel`` inputs, then the recurrent delta
        rule, per value head: read the state with the key, write the correction, read it with the
        query (3 * 2 dk dv)."""
        convolution = 2 * self.conv_kernel * self.conv_channels
        return convolution + self.value_heads * 6 * self.key_head_dim * self.value_head_dim

    def state_bytes(self, dtype_bytes: int) -> int:
        """One sequence's states: the convolution's last ``conv_kernel`` inputs (cache dtype) and the
        recurrent state, dk x dv per value head, kept in float32 (transformers and fla do). They do
        not grow with the sequence, so withdrawal saves none of them."""
        convolution = self.conv_channels * self.conv_kernel * dtype_bytes
        return convolution + 4 * self.value_heads * self.key_head_dim * self.value_head_dim


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP: a router over ``num_experts``, ``experts_per_token`` gated experts
    of width ``expert_intermediate`` per token (what the implementation computes: Llama 4's runs
    every expert on every token and weighs their outputs by the router's scores), and an optional
    always-on shared expert, with a one-output gate (Qwen3.5-MoE) or without (Llama 4)."""

    num_experts: int
    experts_per_token: int
    expert_intermediate: int
    shared_intermediate: int = 0
    shared_gate: bool = True

    def token_flops(self, hidden_size: int) -> int:
        d = hidden_size
        gate = 2 * d if self.shared_gate else 0
        shared = 2 * 3 * d * self.shared_intermediate + gate if self.shared_intermediate else 0
        return 2 * d * self.num_experts + self.experts_per_token * 2 * 3 * d * self.expert_intermediate + shared


NO_RECIPE = architecture.QueryKeyRecipe()  # a text model FastV does not know: plain projections


@dataclass(frozen=True)
class DecoderGeometry:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...] | None = None  # config.layer_types; None: every layer attends
    attention_output_gate: bool = False  # q_proj also yields a per-channel output gate (Qwen3.5)
    linear_attention: LinearAttention | None = None  # the geometry of the linear_attention layers
    experts: Experts | None = None  # the MLP of the layers in ``expert_layers``
    expert_layers: tuple[int, ...] = ()
    sliding_window: int | None = None  # of the sliding_attention layers: their cache keeps window - 1 tokens
    chunk_size: int | None = None  # of the chunked_attention layers: their cache keeps chunk - 1 tokens
    # Gemma 4: its full-attention layers' own head width and KV heads, and whether their values are
    # their keys (no v_proj); a per-layer input of this width in every layer (its gate and
    # projection, 2 * 2 * d * width a token); MLPs twice as wide in the KV-shared layers; experts
    # beside the MLP, not instead of it.
    full_attention_head_dim: int | None = None
    full_attention_kv_heads: int | None = None
    full_attention_values_are_keys: bool = False
    per_layer_input_size: int = 0
    shared_layers_double_mlp: bool = False
    experts_beside_mlp: bool = False
    # For each layer the layer whose keys it reads (Gemma 4's KV-shared layers: no k/v projections,
    # no cache of their own; in generate's prefill transformers runs them on the last position only).
    key_producers: tuple[int | None, ...] | None = None

    @classmethod
    def from_config(cls, config) -> "DecoderGeometry":
        """From a transformers config: a text config, or a multimodal one holding ``text_config``."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kinds = architecture.layer_types(text)
        window = getattr(text, "sliding_window", None)
        # None where the config lists no types and nothing slides (every layer attends), as recorded.
        layer_types = tuple(kinds) if getattr(text, "layer_types", None) or "sliding_attention" in kinds else None
        linear = None
        if layer_types and "linear_attention" in layer_types:
            linear = LinearAttention(
                key_heads=text.linear_num_key_heads,
                value_heads=text.linear_num_value_heads,
                key_head_dim=text.linear_key_head_dim,
                value_head_dim=text.linear_value_head_dim,
                conv_kernel=text.linear_conv_kernel_dim,
            )
        experts, expert_layers, intermediate = None, (), getattr(text, "intermediate_size", 0) or 0
        gemma4, head_dim, kv_heads = {}, None, None
        if text.model_type == "gemma4_text":  # head width and KV heads differ by kind of layer
            full = text.per_layer_config[kinds.index("full_attention")]
            sliding = text.per_layer_config[kinds.index("sliding_attention")] if "sliding_attention" in kinds else full
            head_dim, kv_heads = sliding.head_dim, sliding.num_key_value_heads
            gemma4 = dict(
                full_attention_head_dim=full.head_dim,
                full_attention_kv_heads=full.num_key_value_heads,
                full_attention_values_are_keys=bool(text.attention_k_eq_v),
                per_layer_input_size=text.hidden_size_per_layer_input or 0,
                shared_layers_double_mlp=bool(text.use_double_wide_mlp),
                experts_beside_mlp=bool(text.enable_moe_block),
                key_producers=tuple(architecture.gemma4_key_producers(text)),
            )
            if text.enable_moe_block:  # the router, then its top experts, beside the MLP
                experts = Experts(text.num_experts, text.top_k_experts, text.moe_intermediate_size)
                expert_layers = tuple(range(text.num_hidden_layers))
        elif text.model_type == "llama4_text":  # every expert on every token; its dense layers are wider
            experts = Experts(
                num_experts=text.num_local_experts,
                experts_per_token=text.num_local_experts,
                expert_intermediate=text.intermediate_size,
                shared_intermediate=text.intermediate_size,
                shared_gate=False,
            )
            expert_layers, intermediate = tuple(text.moe_layers), text.intermediate_size_mlp
        elif getattr(text, "num_experts", None):
            experts = Experts(
                num_experts=text.num_experts,
                experts_per_token=text.num_experts_per_tok,
                expert_intermediate=text.moe_intermediate_size,
                shared_intermediate=getattr(text, "shared_expert_intermediate_size", 0) or 0,
            )
            # Qwen3-VL-MoE may keep dense MLPs in some layers (mlp_only_layers, decoder_sparse_step).
            dense = set(getattr(text, "mlp_only_layers", None) or ())
            step = getattr(text, "decoder_sparse_step", 1) or 1
            expert_layers = tuple(i for i in range(text.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
        return cls(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            intermediate_size=intermediate,
            num_heads=heads,
            num_kv_heads=kv_heads or getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim or getattr(text, "head_dim", None) or text.hidden_size // heads,
            layer_types=layer_types,
            attention_output_gate=architecture.QUERY_KEY_RECIPES.get(text.model_type, NO_RECIPE).gated_queries,
            linear_attention=linear,
            experts=experts,
            expert_layers=expert_layers,
            sliding_window=window if layer_types and "sliding_attention" in layer_types else None,
            chunk_size=getattr(text, "attention_chunk_size", None)
            if layer_types and "chunked_attention" in kinds
            else None,
            **gemma4,
        )

    def is_linear(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "linear_attention"

    def cached_tokens(self, layer: int, tokens: int) -> int:
        """How many of ``tokens`` a layer's KV cache holds: a sliding-window layer its last window - 1,
        a chunked layer its last chunk - 1 (transformers keeps it as a sliding window of the chunk size)."""
        kind = self.layer_types[layer] if self.layer_types is not None else "full_attention"
        if kind == "sliding_attention":
            return min(tokens, self.sliding_window - 1)
        if kind == "chunked_attention":
            return min(tokens, self.chunk_size - 1)
        return tokens

    def producer(self, layer: int) -> int | None:
        """The layer whose keys ``layer`` reads (Gemma 4's KV-shared layers), or None: its own."""
        return None if self.key_producers is None else self.key_producers[layer]

    def attention_shape(self, layer: int) -> tuple[int, int]:
        """(kv heads, head width) of an attention layer (Gemma 4's full layers have their own)."""
        if self.full_attention_head_dim and self.layer_types[layer] == "full_attention":
            return self.full_attention_kv_heads or self.num_kv_heads, self.full_attention_head_dim
        return self.num_kv_heads, self.head_dim

    def mlp_flops(self, layer: int) -> int:
        """One token through one layer's MLP (gated: three matrices; or its active experts)."""
        double = self.shared_layers_double_mlp and self.producer(layer) is not None
        dense = 2 * 3 * self.hidden_size * self.intermediate_size * (2 if double else 1)
        if self.experts is not None and layer in self.expert_layers:
            return self.experts.token_flops(self.hidden_size) + (dense if self.experts_beside_mlp else 0)
        return dense

    def token_flops(self, layer: int = 0) -> int:
        """One token through one layer's linear maps (projections, MLP, per-layer input)."""
        if self.is_linear(layer):
            return self.linear_attention.token_flops(self.hidden_size) + self.mlp_flops(layer)
        kv_heads, head_dim = self.attention_shape(layer)
        d, q, kv = self.hidden_size, self.num_heads * head_dim, kv_heads * head_dim
        q_out = 2 * q if self.attention_output_gate else q
        if self.producer(layer) is not None:  # it reads another layer's keys and values
            key_values = 0
        elif self.full_attention_values_are_keys and self.layer_types[layer] == "full_attention":
            key_values = kv
        else:
            key_values = 2 * kv
        per_layer_input = 2 * 2 * d * self.per_layer_input_size
        return 2 * d * (q_out + q + key_values) + self.mlp_flops(layer) + per_layer_input

    def last_query_scoring_flops(self, num_tokens: int) -> int:
        """FastV's ranking in one attention layer: the last position's query and every key projected
        again, and the query against every key (vtw_eval.methods.last_query_attention)."""
        d, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q_out = 2 * q if self.attention_output_gate else q
        return 2 * d * q_out + 2 * num_tokens * d * kv + 2 * num_tokens * q

    def pair_flops(self, layer: int = 0) -> int:
        """One (query, key) pair in one attention layer."""
        return 2 * 2 * self.num_heads * self.attention_shape(layer)[1]

    def _withdrawn(self, withdraw_layer: int | None) -> int:
        """K: the first layer that runs on the kept tokens (L: none)."""
        k = self.num_layers if withdraw_layer is None else withdraw_layer
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"withdraw_layer must be in 0..{self.num_layers} or None, got {withdraw_layer!r}")
        return k

    def layer_flops(self, num_tokens: int, layer: int = 0, num_keys: int | None = None) -> int:
        """One layer's prefill over ``num_tokens`` tokens (attending to ``num_keys`` keys, by
        default themselves)."""
        if self.is_linear(layer):
            mixing = self.linear_attention.prefill_mixing_flops(num_tokens)
        else:
            mixing = num_tokens * (num_tokens if num_keys is None else num_keys) * self.pair_flops(layer)
        return num_tokens * self.token_flops(layer) + mixing

    def prefill_flops(
        self, num_tokens: int, num_removed: int, withdraw_layer: int | None, every_position: bool = False
    ) -> int:
        """The decoder layers' prefill of a prompt. A KV-shared layer attends to its producer's keys
        (every token below K, the kept ones from K on) and runs on the last position only, as
        ``generate`` has it, unless ``every_position`` (a forward that keeps every logit)."""
        k = self._withdrawn(withdraw_layer)
        total = 0
        for i in range(self.num_layers):
            tokens = num_tokens if i < k else num_tokens - num_removed
            producer = self.producer(i)
            if producer is None:
                total += self.layer_flops(tokens, i)
                continue
            keys = num_tokens if producer < k else num_tokens - num_removed
            total += self.layer_flops(tokens if every_position else 1, i, keys)
        return total

    def calibration_flops(self, num_tokens: int, num_removed: int, answer_tokens: int = 0) -> int:
        """Measuring one prompt's KL at every candidate K (calibration.py): with ``answer_tokens``
        > 0 the greedy answer's generation (a prefill and answer_tokens - 1 decoding steps), then one
        unmodified forward over prompt and answer, then layer j over the kept tokens of j + 1
        candidates (L(L+1)/2 layer passes; a recurrent layer runs the copies as a batch)."""
        generation = 0
        if answer_tokens:
            generation = self.prefill_flops(num_tokens, num_removed, None) + sum(
                self.decode_step_flops(num_tokens + step, num_removed, None) for step in range(answer_tokens - 1)
            )
        total = num_tokens + answer_tokens
        # A KV-shared layer's candidates read their producers' keys at every position (docs/design.md).
        candidates = sum(
            (j + 1) * self.layer_flops(total - num_removed, j, None if self.producer(j) is None else total)
            for j in range(self.num_layers)
        )
        return generation + self.prefill_flops(total, num_removed, None, every_position=True) + candidates

    def decode_step_flops(self, context: int, num_removed: int, withdraw_layer: int | None) -> int:
        """One new token after ``context`` tokens (prompt plus tokens generated so far)."""
        k = self._withdrawn(withdraw_layer)
        total = 0
        for i in range(self.num_layers):
            if self.is_linear(i):
                mixing = self.linear_attention.decode_mixing_flops()
            else:  # the new token attends to the keys its layer (or the one it reads) has cached, and itself
                source = i if self.producer(i) is None else self.producer(i)
                cached = self.cached_tokens(source, context - (num_removed if source >= k else 0))
                mixing = self.pair_flops(i) * (cached + 1)
            total += self.token_flops(i) + mixing
        return total

    def decode_step_bytes(
        self,
        context: int,
        num_removed: int,
        withdraw_layer: int | None,
        dtype_bytes: int,
        batch_size: int = 1,
        vocab_size: int = 0,
    ) -> int:
        """Bytes one decoding step reads from memory: every decoder weight matrix a token uses (for
        mixture-of-experts layers, one token's active experts: a lower bound at batch > 1) and the LM
        head's, ``vocab_size`` rows, once for the whole batch; and each row's KV cache and recurrent
        states after ``context`` tokens. At small batches a step is memory-bound, so its time follows this."""
        weights = sum(self.token_flops(i) for i in range(self.num_layers)) // 2 + self.hidden_size * vocab_size
        cache = self.kv_cache_bytes(context, num_removed, withdraw_layer, dtype_bytes)
        return dtype_bytes * weights + batch_size * cache

    def kv_cache_bytes(self, num_tokens: int, num_removed: int, withdraw_layer: int | None, dtype_bytes: int) -> int:
        """Cache size once ``num_tokens`` (prompt and generated) are cached: keys and values of the
        attention layers, and the fixed-size states of the recurrent ones (``recurrent_state_bytes``)."""
        k = self._withdrawn(withdraw_layer)
        attention = sum(
            2 * math.prod(self.attention_shape(i)) * dtype_bytes
            * self.cached_tokens(i, num_tokens if i < k else num_tokens - num_removed)
            for i in range(self.num_layers)
            if not self.is_linear(i) and self.producer(i) is None  # a KV-shared layer caches nothing
        )  # fmt: skip
        return attention + self.recurrent_state_bytes(dtype_bytes)

    def recurrent_state_bytes(self, dtype_bytes: int) -> int:
        """The recurrent layers' states of one sequence, the same with and without withdrawal."""
        linear_layers = sum(self.is_linear(i) for i in range(self.num_layers))
        return linear_layers * self.linear_attention.state_bytes(dtype_bytes) if linear_layers else 0


def analytic_prefill_speedup(
    geometry: DecoderGeometry, num_tokens: int, num_removed: int, withdraw_layer: int | None
) -> float:
    return geometry.prefill_flops(num_tokens, num_removed, None) / geometry.prefill_flops(
        num_tokens, num_removed, withdraw_layer
    )


def request_figures(
    geometry: DecoderGeometry,
    num_tokens: int,
    num_visual: int,
    generated: int,
    withdraw_layer: int | None,
    dtype_bytes: int,
    whole: "WholeModel | Qwen2VLWholeModel | None" = None,
    image_tokens: list[int] | None = None,
    num_removed: int | None = None,
    scoring_flops: int = 0,
) -> dict:
    """One request's token counts, prefill FLOPs and final KV-cache bytes, baseline and VTW.

    ``num_tokens`` is the prompt without padding; the cache ends up holding the prompt and every
    generated token but the last (which is returned, never fed back). ``num_removed`` is what the
    row really withdrew at K (VTW: every visual token, the default). With ``whole`` and the visual
    tokens of each image (``image_tokens``; all of ``num_visual``, no video, all withdrawn), also
    the whole forward's figures. ``scoring_flops``: what choosing the subset cost (FastV's ranking),
    part of the withdrawn prefill.
    """
    k = geometry.num_layers if withdraw_layer is None else withdraw_layer
    num_removed = num_visual if num_removed is None else num_removed
    cached = num_tokens + max(generated - 1, 0)
    baseline_flops = geometry.prefill_flops(num_tokens, num_removed, None)
    vtw_flops = geometry.prefill_flops(num_tokens, num_removed, k) + scoring_flops
    baseline_kv = geometry.kv_cache_bytes(cached, num_removed, None, dtype_bytes)
    vtw_kv = geometry.kv_cache_bytes(cached, num_removed, k, dtype_bytes)
    whole_counted = whole is not None and image_tokens is not None and sum(image_tokens) == num_visual == num_removed
    return {
        "withdraw_layer": k,
        "prompt_tokens": num_tokens,
        "visual_tokens": num_visual,
        "kept_tokens": num_tokens - num_removed if k < geometry.num_layers else num_tokens,
        # Visual tokens each decoder layer sees, averaged over the layers (UniPruneBench's and
        # SparseVLM's measure of a reduction's compute).
        "visual_tokens_per_layer": (k * num_visual + (geometry.num_layers - k) * (num_visual - num_removed))
        / geometry.num_layers,
        "generated_tokens": generated,
        "prefill_flops_baseline": baseline_flops,
        "prefill_flops_vtw": vtw_flops,
        "prefill_flops_saved": 1 - vtw_flops / baseline_flops,
        **({"prefill_flops_scoring": scoring_flops} if scoring_flops else {}),
        "kv_cache_bytes_baseline": baseline_kv,
        "kv_cache_bytes_vtw": vtw_kv,
        "kv_cache_saved": 1 - vtw_kv / baseline_kv,
        # Recurrent layers' states, part of both cache figures: withdrawal does not shrink them.
        **({"recurrent_state_bytes": states} if (states := geometry.recurrent_state_bytes(dtype_bytes)) else {}),
        **(whole_model_figures(whole, num_tokens, image_tokens, k) if whole_counted else {}),
    }


def whole_model_figures(whole, num_tokens: int, image_tokens: list[int], withdraw_layer: int) -> dict:
    """The whole prefill forward (tower, projector, decoder, head), baseline and VTW."""
    baseline = whole.prefill_flops(num_tokens, image_tokens, None)
    vtw = whole.prefill_flops(num_tokens, image_tokens, withdraw_layer)
    return {
        "prefill_flops_whole_model_baseline": baseline,
        "prefill_flops_whole_model_vtw": vtw,
        "prefill_flops_whole_model_saved": 1 - vtw / baseline,
    }


@dataclass(frozen=True)
class WholeModel:
    """A LLaVA-1.5 model around its decoder: the ViT image encoder, the projector and the LM head."""

    decoder: DecoderGeometry
    tower_layers: int
    tower_hidden: int
    tower_intermediate: int
    image_size: int
    patch_size: int
    num_channels: int
    class_token: bool  # CLIP prepends one to the patches; SigLIP does not
    projected_class_token: bool  # vision_feature_select_strategy "full" keeps it as a visual token
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "WholeModel | None":
        """For LLaVA-1.5 configs (one tower pass per image); None for other architectures, whose
        towers (tiles, Qwen2-VL's merger) are not modelled."""
        vision = getattr(config, "vision_config", None)
        if getattr(config, "model_type", None) != "llava" or vision is None:
            return None
        if vision.model_type not in ("clip_vision_model", "siglip_vision_model"):
            return None
        return cls(
            decoder=DecoderGeometry.from_config(config),
            tower_layers=vision.num_hidden_layers,
            tower_hidden=vision.hidden_size,
            tower_intermediate=vision.intermediate_size,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            num_channels=vision.num_channels,
            class_token=vision.model_type == "clip_vision_model",
            projected_class_token=vision.model_type == "clip_vision_model"
            and getattr(config, "vision_feature_select_strategy", "default") == "full",
            vocab_size=config.get_text_config().vocab_size,
        )

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def image_flops(self) -> int:
        """One image through the tower: patch convolution, then every layer."""
        h, m, t = self.tower_hidden, self.tower_intermediate, self.patches + self.class_token
        convolution = 2 * self.patches * self.num_channels * self.patch_size**2 * h
        return convolution + self.tower_layers * (8 * t * h * h + 4 * t * h * m + 4 * t * t * h)

    def projector_flops(self, num_visual: int) -> int:
        d = self.decoder.hidden_size
        return 2 * num_visual * (self.tower_hidden * d + d * d)

    def head_flops(self, positions: int = 1) -> int:
        return 2 * positions * self.decoder.hidden_size * self.vocab_size

    def prefill_flops(self, num_tokens: int, image_tokens: list[int], withdraw_layer: int | None) -> int:
        """The whole prefill forward of a prompt with images of ``image_tokens`` visual tokens each."""
        num_visual = sum(image_tokens)
        images = num_visual // (self.patches + self.projected_class_token)
        around = images * self.image_flops() + self.projector_flops(num_visual) + self.head_flops()
        return around + self.decoder.prefill_flops(num_tokens, num_visual, withdraw_layer)


@dataclass(frozen=True)
class Qwen2VLWholeModel:
    """A Qwen2-VL, Qwen3-VL or Qwen3.5 model around its decoder: the ViT with its patch merger (and
    Qwen3-VL's DeepStack mergers), and the LM head."""

    decoder: DecoderGeometry
    depth: int
    embed_dim: int
    mlp_hidden: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge: int
    vocab_size: int
    mergers: int = 1  # Qwen3-VL: one more per DeepStack block, each the same MLP over merged patches

    @classmethod
    def from_config(cls, config) -> "Qwen2VLWholeModel":
        vision = config.vision_config
        if config.model_type == "qwen2_vl":
            embed_dim, mlp_hidden = vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio)
        else:  # Qwen3-VL and Qwen3.5 name the ViT width hidden_size
            embed_dim, mlp_hidden = vision.hidden_size, vision.intermediate_size
        return cls(
            decoder=DecoderGeometry.from_config(config),
            depth=vision.depth,
            embed_dim=embed_dim,
            mlp_hidden=mlp_hidden,
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            in_channels=vision.in_channels,
            spatial_merge=vision.spatial_merge_size,
            vocab_size=config.get_text_config().vocab_size,
            mergers=1 + len(getattr(vision, "deepstack_visual_indexes", None) or ()),
        )

    def image_flops(self, visual_tokens: int) -> int:
        """One image of ``visual_tokens`` tokens: patch convolution, every block, the merger."""
        e, m, group = self.embed_dim, self.mlp_hidden, self.spatial_merge**2
        n = visual_tokens * group
        convolution = 2 * n * self.in_channels * self.temporal_patch_size * self.patch_size**2 * e
        block = 8 * n * e * e + 4 * n * e * m + 4 * n * n * e
        merger = 2 * visual_tokens * (group * e) ** 2 + 2 * visual_tokens * group * e * self.decoder.hidden_size
        return convolution + self.depth * block + self.mergers * merger

    def head_flops(self, positions: int = 1) -> int:
        return 2 * positions * self.decoder.hidden_size * self.vocab_size

    def prefill_flops(self, num_tokens: int, image_tokens: list[int], withdraw_layer: int | None) -> int:
        """The whole prefill forward of a prompt with images of ``image_tokens`` visual tokens each."""
        around = sum(self.image_flops(v) for v in image_tokens) + self.head_flops()
        return around + self.decoder.prefill_flops(num_tokens, sum(image_tokens), withdraw_layer)


QWEN_VIT_MODELS = ("qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def whole_model_of(config) -> WholeModel | Qwen2VLWholeModel | None:
    """The whole-forward cost model of a config: LLaVA-1.5 (CLIP/SigLIP), Qwen2-VL, Qwen3-VL or
    Qwen3.5; None for the others (LLaVA-NeXT's and OneVision's tiles, Qwen2.5-VL's windowed
    attention are not modelled)."""
    if getattr(config, "model_type", None) in QWEN_VIT_MODELS:
        return Qwen2VLWholeModel.from_config(config)
    return WholeModel.from_config(config)
