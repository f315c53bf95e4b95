"""A naive VTW forward, written independently of vtw_eval.engine, to test it against.

Layers < K run on the full sequence (taken from the unmodified model's hidden states); layers
>= K run on the kept sub-sequence (every text position, or any ``keep`` subset) with the original
position ids (also where Llama 4's NoPE layers scale their queries by them), a hand-made causal mask
(chunked by original position for Llama 4's chunked layers) (none for a recurrent layer, which runs over the kept tokens
in order; a sliding window counted in original positions), DeepStack features added at kept visual
positions, and no KV cache; then the final norm and the LM head. Gemma 4: each layer's per-layer
input at the kept positions; a KV-shared layer reads its producer's keys (the last layer of its
kind before the shared ones): the kept ones if the producer is >= K, else all of them from the
unmodified forward with the withdrawn positions masked.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch


@torch.no_grad()
def reference_vtw_logits(
    model, inputs: dict, withdraw_layer: int, keep: torch.Tensor | None = None, window_counts: str = "positions"
):
    """Logits at the kept positions of a single unpadded prompt, and those positions. A sliding
    window, Llama 4's chunks and its NoPE layers' query scales count original positions; with
    ``window_counts="slots"``, kept tokens instead (what a withdrawal that ignores the gaps would do)."""
    language_model = decoder_of(model)
    full, inputs_of_layers, seen, second_inputs, stored_keys = unmodified_forward(model, inputs)
    input_ids = inputs["input_ids"][0]
    if keep is None:
        keep = ~torch.isin(input_ids, torch.tensor(visual_ids(model.config)))
    kept_positions = keep.nonzero()[:, 0]
    if withdraw_layer == len(language_model.layers):
        return full.logits[:, kept_positions], kept_positions
    position_ids = seen.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(len(input_ids))[None]
    if position_ids.ndim == 3 and position_ids.shape[0] == 4:  # Qwen2-VL: a text row, then 3 rotary rows
        position_ids = position_ids[1:]
    hidden = inputs_of_layers[withdraw_layer][:, kept_positions]  # input of layer K
    kept_ids = position_ids[..., kept_positions]
    n = len(kept_positions)
    causal = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    config = language_model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if window else "full_attention"] * len(language_model.layers)
    )
    # A sliding window by original position: key j is seen from query i if i - window < j <= i.
    numbers = kept_positions if window_counts == "positions" else torch.arange(len(kept_positions))
    distance = numbers[:, None] - numbers[None, :]
    windowed = causal.masked_fill((distance >= window)[None, None], torch.finfo(hidden.dtype).min) if window else None
    # Llama 4's chunks by original position: key j is seen from query i if both are in one chunk.
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk:
        other_chunk = (numbers[:, None] // chunk != numbers[None, :] // chunk)[None, None]
        chunked = causal.masked_fill(other_chunk, torch.finfo(hidden.dtype).min)
    # DeepStack (Qwen3-VL): features added at the visual positions after the first layers; a kept
    # visual position gets its own row (the rows follow the visual positions in order).
    deepstack = seen.get("deepstack_visual_embeds") or []
    if deepstack:
        visual = seen["visual_pos_masks"][0]
        kept_visual = visual[kept_positions]
        rows = (visual.cumsum(0) - 1)[kept_positions][kept_visual]
    producers = shared_key_producers(config)
    stored = {}  # keys and values the layers >= K store for the layers that share them
    for index in range(withdraw_layer, len(language_model.layers)):
        # A recurrent (linear attention) layer is causal by construction and takes no mask here.
        mask = {"linear_attention": None, "sliding_attention": windowed}.get(layer_types[index], causal)
        if layer_types[index] == "chunked_attention":
            mask = chunked
        if "layer_type" in inspect.signature(language_model.rotary_emb.forward).parameters:  # Gemma 3: per kind
            position_embeddings = language_model.rotary_emb(hidden, kept_ids, layer_types[index])
        else:
            position_embeddings = language_model.rotary_emb(hidden, position_ids=kept_ids)
        # One row of positions: the layer's own too (Ministral 3 scales its queries by them).
        positions = {"position_ids": kept_ids} if kept_ids.ndim == 2 else {}
        extra = []  # Gemma 4's per-layer input, kept positions
        if second_inputs[index] is not None:
            extra = [second_inputs[index][:, kept_positions]]
        if "shared_kv_states" in inspect.signature(language_model.layers[index].forward).parameters:
            positions["shared_kv_states"] = stored  # Gemma 4's layers store keys there (or read them)
        if producers:
            producer = producers[index]
            if producer is not None and producer < withdraw_layer:  # every token's keys, withdrawn ones masked
                kind = layer_types[index]
                stored[kind] = stored_keys[kind]
                everything = torch.arange(len(input_ids))
                hidden_mask = (everything[None, :] > kept_positions[:, None]) | ~keep[None, :]
                if kind == "sliding_attention":
                    hidden_mask |= everything[None, :] <= kept_positions[:, None] - window
                mask = torch.zeros(hidden_mask.shape, dtype=hidden.dtype)
                mask = mask.masked_fill(hidden_mask, torch.finfo(hidden.dtype).min)[None, None]
        with queries_tuned_to(language_model.layers[index], numbers):
            hidden = language_model.layers[index](
                hidden, *extra, attention_mask=mask, position_embeddings=position_embeddings, **positions
            )
        if index < len(deepstack) and kept_visual.any():
            hidden = hidden.clone()
            hidden[0, kept_visual] += deepstack[index][rows].to(hidden.dtype)
    return model.get_output_embeddings()(language_model.norm(hidden)), kept_positions


@contextmanager
def queries_tuned_to(layer, positions: torch.Tensor):
    """Llama 4's NoPE layers scale each query by its position, which they count themselves (here,
    without a cache, from 0 over the kept tokens): within this, such a layer's queries are scaled
    for ``positions`` instead, by the formula of Llama 4's config (attention temperature tuning)."""
    attention = getattr(layer, "self_attn", None)  # a recurrent layer (Qwen3.5) has none
    config = getattr(attention, "config", None)
    if not getattr(config, "attn_temperature_tuning", False) or config.no_rope_layers[attention.layer_idx]:
        yield
        return

    def scale(numbers):
        return torch.log1p(torch.floor((numbers.float() + 1.0) / config.floor_scale)) * config.attn_scale + 1.0

    def retune(module, args, output):
        counted = torch.arange(output.shape[1])
        return output * (scale(positions) / scale(counted))[None, :, None].to(output.dtype)

    handle = attention.q_proj.register_forward_hook(retune)
    try:
        yield
    finally:
        handle.remove()


def shared_key_producers(config) -> list:
    """Gemma 4: for each layer, the layer whose keys it reads (the last of its kind before the
    last ``num_kv_shared_layers``), or None; an empty list for models that share none."""
    shared = getattr(config, "num_kv_shared_layers", 0) or 0
    if not shared:
        return []
    kinds, first = config.layer_types, config.num_hidden_layers - shared
    last_of_kind = {kind: index for index, kind in enumerate(kinds[:first])}
    return [None if index < first else last_of_kind[kind] for index, kind in enumerate(kinds)]


@torch.no_grad()
def unmodified_forward(model, inputs: dict) -> tuple:
    """The unmodified model's output, each decoder layer's input (after DeepStack's additions of
    the layers before it, which ``output_hidden_states`` does not include), the keyword arguments
    its language model got (position ids: 3 rows for Qwen2-VL; DeepStack's features), each layer's
    second positional input (Gemma 4's per-layer input; else None) and the keys and values its
    layers stored for sharing, by layer type (Gemma 4)."""
    language_model = decoder_of(model)
    seen, layer_inputs, second_inputs, stored = {}, [], [], {}

    def record(module, args, kwargs):
        layer_inputs.append(args[0] if args else kwargs["hidden_states"])
        second_inputs.append(args[1] if len(args) > 1 else None)
        stored["keys"] = kwargs.get("shared_kv_states")

    handles = [language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in language_model.layers]
    full = model(**inputs, use_cache=False)
    for handle in handles:
        handle.remove()
    return full, layer_inputs, seen, second_inputs, dict(stored.get("keys") or {})


def decoder_of(model):
    """The decoder stack by transformers' attribute names (SmolVLM's is ``text_model``, Llama 4's
    ``language_model.model``)."""
    if not hasattr(model, "model"):
        return model.language_model.model
    inner = model.model
    return inner.text_model if hasattr(inner, "text_model") else inner.language_model


def visual_ids(config) -> list[int]:
    """Image and video token ids, read off the config by their transformers names."""
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return [getattr(config, name) for name in names if getattr(config, name, None) is not None]
