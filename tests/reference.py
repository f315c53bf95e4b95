"""A naive VTW forward, written independently of vtw_eval.engine, to test it against.

Layers < K run on the full sequence (taken from the unmodified model's hidden states); layers
>= K run on the kept sub-sequence with the original position ids, a hand-made causal mask and no
KV cache; then the final norm and the LM head.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_vtw_logits(model, inputs: dict, withdraw_layer: int, keep: torch.Tensor | None = None):
    """Logits at the kept positions of a single unpadded prompt, and those positions."""
    language_model = model.model.language_model
    full = model(**inputs, output_hidden_states=True, use_cache=False)
    input_ids = inputs["input_ids"][0]
    if keep is None:
        keep = input_ids != model.config.image_token_id
    kept_positions = keep.nonzero()[:, 0]
    if withdraw_layer == len(language_model.layers):
        return full.logits[:, kept_positions], kept_positions
    hidden = full.hidden_states[withdraw_layer][:, kept_positions]  # input of layer K
    position_ids = kept_positions[None]
    position_embeddings = language_model.rotary_emb(hidden, position_ids=position_ids)
    n = len(kept_positions)
    causal = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    for layer in language_model.layers[withdraw_layer:]:
        hidden = layer(
            hidden, attention_mask=causal, position_embeddings=position_embeddings, position_ids=position_ids
        )
    return model.lm_head(language_model.norm(hidden)), kept_positions
