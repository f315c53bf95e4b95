"""A naive VTW forward, written independently of vtw_eval.engine, to test it against.

Layers < K run on the full sequence (taken from the unmodified model's hidden states); layers
>= K run on the kept sub-sequence with the original position ids, a hand-made causal mask (none
for a recurrent layer, which runs over the kept tokens in order; a sliding window counted in
original positions) and no KV cache; then the final norm and the LM head.
"""

from __future__ import annotations

import inspect

import torch


@torch.no_grad()
def reference_vtw_logits(
    model, inputs: dict, withdraw_layer: int, keep: torch.Tensor | None = None, window_counts: str = "positions"
):
    """Logits at the kept positions of a single unpadded prompt, and those positions. A sliding
    window counts original positions; with ``window_counts="slots"``, kept tokens instead (what a
    withdrawal that ignores the gaps would do)."""
    language_model = model.model.language_model
    seen = {}  # the position ids the unmodified model gives its decoder (3 rows for Qwen2-VL)
    handle = language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    full = model(**inputs, output_hidden_states=True, use_cache=False)
    handle.remove()
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
    hidden = full.hidden_states[withdraw_layer][:, kept_positions]  # input of layer K
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
    for index in range(withdraw_layer, len(language_model.layers)):
        # A recurrent (linear attention) layer is causal by construction and takes no mask here.
        mask = {"linear_attention": None, "sliding_attention": windowed}.get(layer_types[index], causal)
        if "layer_type" in inspect.signature(language_model.rotary_emb.forward).parameters:  # Gemma 3: per kind
            position_embeddings = language_model.rotary_emb(hidden, kept_ids, layer_types[index])
        else:
            position_embeddings = language_model.rotary_emb(hidden, position_ids=kept_ids)
        hidden = language_model.layers[index](hidden, attention_mask=mask, position_embeddings=position_embeddings)
    return model.lm_head(language_model.norm(hidden)), kept_positions


def visual_ids(config) -> list[int]:
    """Image and video token ids, read off the config by their transformers names."""
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return [getattr(config, name) for name in names if getattr(config, name, None) is not None]
