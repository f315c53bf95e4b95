"""What the engine must be told about a model family: the adapter contract.

Every backend adapter declares one ``Architecture`` (``VTWBackend.architecture``), and the tests
build their engines from the same declarations; nothing here is guessed from a model at run time
beyond reading its config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DECODING_POSITIONS = ("count", "from_attention_mask")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# The config fields that hold the token ids of visual positions, in transformers' names.
VISUAL_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


@dataclass(frozen=True)
class KeySharing:
    """Decoder layers that attend to the keys and values an earlier layer of theirs computed in
    the same forward, instead of projecting their own (Gemma 4's last ``num_kv_shared_layers``).

    - ``argument``: the decoder layer's keyword that carries them, a mapping from the producing
      layer's type to its (keys, values), each (batch, kv heads, keys, head dim): what the producer's
      attention returned from its cache, so every token it cached (a sliding layer: its window);
    - ``producers``: from the text config, for each decoder layer the index of the layer whose keys
      it reads, or None where it computes its own.
    """

    argument: str
    producers: Callable[[Any], list[int | None]]


@dataclass(frozen=True)
class Architecture:
    """What differs by model family, declared by its adapter.

    - ``decoding_positions``: how the model numbers the tokens of a decoding step that comes
      without position ids. ``"count"``: from the length of its layer-0 cache (LLaVA), which the
      engine replaces by positions after the full prompt (that cache is reduced when K = 0);
      ``"from_attention_mask"``: from the 2D attention mask, as multimodal rotary positions are
      (Qwen2-VL, GLM-4.1V), which the engine then gives in full.
    - ``injected_visual_features``: the language model's keyword, if any, carrying visual features
      added at the visual positions after decoder layer i for its i-th entry (Qwen3-VL's DeepStack
      ``deepstack_visual_embeds``).
    - ``recurrent_layer_types``: the entries of ``config.layer_types`` that are recurrent layers
      (Qwen3.5's Gated DeltaNet ``linear_attention``): a convolution and a recurrent state instead
      of keys and values, and the 2D padding mask instead of a causal one.
    - ``visual_token_fields``: the config fields naming the token ids whose positions hold visual
      embeddings (image first, then video).
    - ``complex_rotary``: the decoder gives its layers one complex tensor of rotations (Llama 4)
      instead of a (cos, sin) pair.
    - ``query_position_scale``: for attention modules that scale their queries by positions they
      count themselves (the layer's cache length plus the call's token index: Llama 4's NoPE layers'
      temperature tuning), given a layer's attention module, the scale as a function of positions,
      or None where that layer does not scale. The engine rescales each query from the counted
      position to its own (its original one, counted from the row's first real token).
    - ``per_layer_input``: the name of a decoder layer's argument that carries a second per-token
      tensor beside the hidden states, (batch, tokens, width) (Gemma 4's per-layer inputs), which
      the engine gathers at the kept positions with them.
    - ``key_sharing``: the layers that read another layer's keys and values (``KeySharing``).
    """

    decoding_positions: str = "count"
    injected_visual_features: str | None = None
    recurrent_layer_types: tuple[str, ...] = ()
    visual_token_fields: tuple[str, ...] = VISUAL_TOKEN_FIELDS
    complex_rotary: bool = False
    query_position_scale: Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor] | None] | None = None
    per_layer_input: str | None = None
    key_sharing: KeySharing | None = None

    def __post_init__(self) -> None:
        if self.decoding_positions not in DECODING_POSITIONS:
            raise ValueError(f"decoding_positions={self.decoding_positions!r}; use one of {DECODING_POSITIONS}")

    def visual_token_ids(self, config) -> list[int]:
        """Token ids whose positions hold visual embeddings, in the order of the fields."""
        ids = []
        for name in self.visual_token_fields:
            value = getattr(config, name, None)
            if value is not None and value not in ids:
                ids.append(int(value))
        if not ids:
            raise ValueError(f"{type(config).__name__} names no image or video token id; cannot find visual tokens.")
        return ids

    def key_producers(self, text_config) -> list[int | None]:
        """For each decoder layer, the layer whose keys and values it reads, or None (its own)."""
        if self.key_sharing is None:
            return [None] * text_config.num_hidden_layers
        return list(self.key_sharing.producers(text_config))

    def layer_kinds(self, model: nn.Module) -> list[str]:
        """Each decoder layer's type; a type neither an attention kind nor a declared recurrent
        one is refused now, rather than masked as another kind later."""
        config = language_model_of(model).config
        kinds = layer_types(config)
        for index, kind in enumerate(kinds):
            if kind not in ATTENTION_LAYER_TYPES and kind not in self.recurrent_layer_types:
                raise ValueError(
                    f"decoder layer {index} of {type(model).__name__} is of type {kind!r}; VTW knows "
                    f"{sorted(ATTENTION_LAYER_TYPES)} and the recurrent types its adapter declares: "
                    f"{self.recurrent_layer_types}"
                )
        return kinds


@dataclass(frozen=True)
class QueryKeyRecipe:
    """How a text model's attention makes its queries and keys from its input, beyond ``q_proj``,
    ``k_proj`` and its modeling module's ``apply_rotary_pos_emb`` (read from transformers' modeling
    files): per-head RMS norms on both (``q_norm``, ``k_norm``), an output gate packed beside each
    head's query in ``q_proj`` (Qwen3.5), and queries scaled by their position, Llama 4's
    ``1 + beta * log(1 + floor(position / original_max_position_embeddings))`` with both numbers
    from ``rope_parameters`` (Ministral 3). FastV recomputes the last query's attention from these."""

    query_key_norms: bool = False
    gated_queries: bool = False
    position_scaled_queries: bool = False


# By the text config's model_type: the language models the adapters serve.
QUERY_KEY_RECIPES = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "glm4v_text"), QueryKeyRecipe()),
    **dict.fromkeys(("qwen3", "qwen3_vl_text", "qwen3_vl_moe_text", "gemma3_text"), QueryKeyRecipe(True)),
    **dict.fromkeys(("qwen3_5_text", "qwen3_5_moe_text"), QueryKeyRecipe(True, gated_queries=True)),
    "ministral3": QueryKeyRecipe(position_scaled_queries=True),
}


def gemma4_key_producers(text_config) -> list[int | None]:
    """Gemma 4: for each layer, the layer whose keys it reads. A ``reuse`` layer reads the ``store``
    layer of its own kind (transformers' ``kv_sharing_modes``); every other layer its own (None)."""
    modes, kinds = text_config.kv_sharing_modes, text_config.layer_types
    stores = {kinds[index]: index for index, mode in enumerate(modes) if mode == "store"}
    return [stores[kinds[index]] if mode == "reuse" else None for index, mode in enumerate(modes)]


def layer_types(text_config) -> list[str]:
    """Each decoder layer's entry in ``config.layer_types`` (``full_attention``,
    ``sliding_attention``, ``linear_attention``, ...); a config without that list has every layer
    slide when it names a sliding window (Mistral), else attend to everything."""
    if getattr(text_config, "layer_types", None) is not None:
        return list(text_config.layer_types)
    kind = "sliding_attention" if getattr(text_config, "sliding_window", None) else "full_attention"
    return [kind] * text_config.num_hidden_layers


def language_model_of(model: nn.Module) -> nn.Module:
    """The decoder stack (the module with ``.layers`` and ``.norm``) of a transformers VLM."""
    # SmolVLM's decoder is ``model.text_model``, Llama 4's ``language_model.model``; most families
    # name it ``model.language_model``.
    for path in ("model.language_model", "model.text_model", "language_model", "language_model.model", "model"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None and isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module
    raise ValueError(f"Cannot find the language decoder layers of {type(model).__name__}.")
