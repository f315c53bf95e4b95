"""What a LLaMA-style decoder costs, with and without visual tokens withdrawn before layer K,
and what the whole LLaVA-1.5 or Qwen2-VL forward costs around it.

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
  and 4.81 TFLOPs with K=16 (VTW reports 8.48 and 4.68 with calflops).
KV-cache bytes: keys and values, kv_heads*head_dim each per token and layer, at the cache dtype.
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
as above. Images only: a video's patch grid (frames) is not known from its token count.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderGeometry:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "DecoderGeometry":
        """From a transformers config: a text config, or a multimodal one holding ``text_config``."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        )

    def token_flops(self) -> int:
        """One token through one layer's linear maps (projections and MLP)."""
        d, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * d * (2 * q + 2 * kv) + 2 * 3 * d * self.intermediate_size

    def pair_flops(self) -> int:
        """One (query, key) pair in one layer's attention."""
        return 2 * 2 * self.num_heads * self.head_dim

    def _split(self, withdraw_layer: int | None) -> tuple[int, int]:
        """(layers on the full sequence, layers on the kept tokens)."""
        k = self.num_layers if withdraw_layer is None else withdraw_layer
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"withdraw_layer must be in 0..{self.num_layers} or None, got {withdraw_layer!r}")
        return k, self.num_layers - k

    def layer_flops(self, num_tokens: int) -> int:
        """One layer's prefill over ``num_tokens`` tokens."""
        return num_tokens * self.token_flops() + num_tokens * num_tokens * self.pair_flops()

    def prefill_flops(self, num_tokens: int, num_visual: int, withdraw_layer: int | None) -> int:
        full_layers, withdrawn_layers = self._split(withdraw_layer)
        return full_layers * self.layer_flops(num_tokens) + withdrawn_layers * self.layer_flops(num_tokens - num_visual)

    def calibration_flops(self, num_tokens: int, num_visual: int, answer_tokens: int = 0) -> int:
        """Measuring one prompt's KL at every candidate K (calibration.py): with ``answer_tokens``
        > 0 the greedy answer's generation (a prefill and answer_tokens - 1 decoding steps), then one
        unmodified forward over prompt and answer, then layer j over the kept tokens of j + 1
        candidates (L(L+1)/2 layer passes)."""
        generation = 0
        if answer_tokens:
            generation = self.prefill_flops(num_tokens, num_visual, None) + sum(
                self.decode_step_flops(num_tokens + step, num_visual, None) for step in range(answer_tokens - 1)
            )
        total = num_tokens + answer_tokens
        candidates = self.num_layers * (self.num_layers + 1) // 2 * self.layer_flops(total - num_visual)
        return generation + self.prefill_flops(total, num_visual, None) + candidates

    def decode_step_flops(self, context: int, num_visual: int, withdraw_layer: int | None) -> int:
        """One new token after ``context`` tokens (prompt plus tokens generated so far)."""
        full_layers, withdrawn_layers = self._split(withdraw_layer)
        keys_full, keys_kept = context + 1, context + 1 - num_visual
        return self.num_layers * self.token_flops() + self.pair_flops() * (
            full_layers * keys_full + withdrawn_layers * keys_kept
        )

    def decode_step_bytes(
        self,
        context: int,
        num_visual: int,
        withdraw_layer: int | None,
        dtype_bytes: int,
        batch_size: int = 1,
        vocab_size: int = 0,
    ) -> int:
        """Bytes one decoding step reads from memory: every decoder weight matrix (and the LM
        head's, ``vocab_size`` rows) once for the whole batch, and each row's KV cache after
        ``context`` tokens. At small batches a step is memory-bound, so its time follows this."""
        weights = self.num_layers * self.token_flops() // 2 + self.hidden_size * vocab_size
        cache = self.kv_cache_bytes(context, num_visual, withdraw_layer, dtype_bytes)
        return dtype_bytes * weights + batch_size * cache

    def kv_cache_bytes(self, num_tokens: int, num_visual: int, withdraw_layer: int | None, dtype_bytes: int) -> int:
        """Cache size once ``num_tokens`` (prompt and generated) are cached."""
        full_layers, withdrawn_layers = self._split(withdraw_layer)
        per_token_layer = 2 * self.num_kv_heads * self.head_dim * dtype_bytes
        return per_token_layer * (full_layers * num_tokens + withdrawn_layers * (num_tokens - num_visual))


def analytic_prefill_speedup(
    geometry: DecoderGeometry, num_tokens: int, num_visual: int, withdraw_layer: int | None
) -> float:
    return geometry.prefill_flops(num_tokens, num_visual, None) / geometry.prefill_flops(
        num_tokens, num_visual, withdraw_layer
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
) -> dict:
    """One request's token counts, prefill FLOPs and final KV-cache bytes, baseline and VTW.

    ``num_tokens`` is the prompt without padding; the cache ends up holding the prompt and every
    generated token but the last (which is returned, never fed back). With ``whole`` and the
    visual tokens of each image (``image_tokens``; all of ``num_visual``, no video), also the
    whole forward's figures.
    """
    k = geometry.num_layers if withdraw_layer is None else withdraw_layer
    cached = num_tokens + max(generated - 1, 0)
    baseline_flops = geometry.prefill_flops(num_tokens, num_visual, None)
    vtw_flops = geometry.prefill_flops(num_tokens, num_visual, k)
    baseline_kv = geometry.kv_cache_bytes(cached, num_visual, None, dtype_bytes)
    vtw_kv = geometry.kv_cache_bytes(cached, num_visual, k, dtype_bytes)
    return {
        "withdraw_layer": k,
        "prompt_tokens": num_tokens,
        "visual_tokens": num_visual,
        "kept_tokens": num_tokens - num_visual if k < geometry.num_layers else num_tokens,
        "generated_tokens": generated,
        "prefill_flops_baseline": baseline_flops,
        "prefill_flops_vtw": vtw_flops,
        "prefill_flops_saved": 1 - vtw_flops / baseline_flops,
        "kv_cache_bytes_baseline": baseline_kv,
        "kv_cache_bytes_vtw": vtw_kv,
        "kv_cache_saved": 1 - vtw_kv / baseline_kv,
        **(
            whole_model_figures(whole, num_tokens, image_tokens, k)
            if whole is not None and image_tokens is not None and sum(image_tokens) == num_visual
            else {}
        ),
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
    """A Qwen2-VL model around its decoder: the ViT with its patch merger, and the LM head."""

    decoder: DecoderGeometry
    depth: int
    embed_dim: int
    mlp_hidden: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "Qwen2VLWholeModel":
        vision = config.vision_config
        return cls(
            decoder=DecoderGeometry.from_config(config),
            depth=vision.depth,
            embed_dim=vision.embed_dim,
            mlp_hidden=int(vision.embed_dim * vision.mlp_ratio),
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            in_channels=vision.in_channels,
            spatial_merge=vision.spatial_merge_size,
            vocab_size=config.get_text_config().vocab_size,
        )

    def image_flops(self, visual_tokens: int) -> int:
        """One image of ``visual_tokens`` tokens: patch convolution, every block, the merger."""
        e, m, group = self.embed_dim, self.mlp_hidden, self.spatial_merge**2
        n = visual_tokens * group
        convolution = 2 * n * self.in_channels * self.temporal_patch_size * self.patch_size**2 * e
        block = 8 * n * e * e + 4 * n * e * m + 4 * n * n * e
        merger = 2 * visual_tokens * (group * e) ** 2 + 2 * visual_tokens * group * e * self.decoder.hidden_size
        return convolution + self.depth * block + merger

    def head_flops(self, positions: int = 1) -> int:
        return 2 * positions * self.decoder.hidden_size * self.vocab_size

    def prefill_flops(self, num_tokens: int, image_tokens: list[int], withdraw_layer: int | None) -> int:
        """The whole prefill forward of a prompt with images of ``image_tokens`` visual tokens each."""
        around = sum(self.image_flops(v) for v in image_tokens) + self.head_flops()
        return around + self.decoder.prefill_flops(num_tokens, sum(image_tokens), withdraw_layer)


def whole_model_of(config) -> WholeModel | Qwen2VLWholeModel | None:
    """The whole-forward cost model of a config: LLaVA-1.5 (CLIP/SigLIP) or Qwen2-VL; None for the
    others (LLaVA-NeXT's and OneVision's tiles, Qwen2.5-VL's windowed attention are not modelled)."""
    if getattr(config, "model_type", None) == "qwen2_vl":
        return Qwen2VLWholeModel.from_config(config)
    return WholeModel.from_config(config)
