"""Choosing the withdrawal layer K the way the VTW paper does: the maths.

For each calibration prompt and each candidate layer k in 0..L: the next-token distribution at
the last prompt position of the unmodified model (p_full) and with withdrawal before layer k
(p_k), and KL(p_k || p_full). K is the smallest k whose mean KL over the samples is at most the
threshold (0.003 by default, the paper's LLaVA-1.5-7B setting).

All k come from one full forward per batch that keeps every layer's input hidden states, then
each layer j runs once over the kept tokens of all candidates k <= j stacked along the batch (the
reference implementation runs a whole forward per candidate layer).

The lmms-eval task hooks are in ``calibration_task.py``, the file and plot in ``calibration_file.py``.
"""

from __future__ import annotations

import datetime

import torch

from vtw_eval.engine import VisualTokenWithdrawal, plan_withdrawal, withdrawn_layer_mask

DEFAULT_KL_THRESHOLD = 0.003


def tile_batch(tensor: torch.Tensor, copies: int, trailing_dims: int) -> torch.Tensor:
    """Repeat along the batch dimension, the one followed by ``trailing_dims`` dimensions."""
    repeats = [1] * tensor.dim()
    repeats[tensor.dim() - 1 - trailing_dims] = copies
    return tensor.repeat(*repeats)


@torch.inference_mode()
def every_layer_last_hidden(
    withdrawal: VisualTokenWithdrawal, inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One unmodified forward of ``inputs`` and, from it, for every candidate k in 0..L-1 the
    final-norm hidden state of the last prompt token with withdrawal before layer k.

    Returns the unmodified model's last-position logits (batch, vocab) and the hidden states
    (L, batch, hidden). The forward keeps each layer's input; then each layer j runs once, over
    the kept tokens of all candidates k <= j stacked along the batch, with no KV cache.
    """
    language_model = withdrawal.language_model
    saved, withdrawal.withdraw_layer = withdrawal.withdraw_layer, None
    layer_kwargs = {}  # the positions the decoder gives its layers (3-row rotary for Qwen2-VL)
    capture = language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: layer_kwargs.update(kwargs), with_kwargs=True
    )
    try:
        full = withdrawal.model(**inputs, output_hidden_states=True, use_cache=False)
    finally:
        capture.remove()
        withdrawal.withdraw_layer = saved
    plan = plan_withdrawal(inputs["input_ids"], inputs.get("attention_mask"), withdrawal.visual_token_ids)
    cos, sin = (plan.gather(t) for t in layer_kwargs["position_embeddings"])
    position_ids = layer_kwargs.get("position_ids")
    if position_ids is not None:
        position_ids = plan.gather(position_ids[..., None])[..., 0]
    hidden = None
    for index, layer in enumerate(language_model.layers):
        candidate = plan.gather(full.hidden_states[index])  # withdrawal before this layer joins
        hidden = candidate if hidden is None else torch.cat([hidden, candidate.to(hidden.device)], dim=0)
        copies = index + 1
        mask_2d = tile_batch(plan.kept_attention_mask, copies, 1)
        hidden = layer(
            hidden,
            attention_mask=withdrawn_layer_mask(language_model.config, index, hidden, mask_2d, None),
            position_embeddings=(tile_batch(cos, copies, 2), tile_batch(sin, copies, 2)),
            position_ids=None if position_ids is None else tile_batch(position_ids, copies, 1),
            use_cache=False,
        )
    last = language_model.norm(hidden[:, -1])
    return full.logits[:, -1], last.view(withdrawal.num_layers, plan.kept_positions.shape[0], -1)


@torch.inference_mode()
def layer_kl_divergences(withdrawal: VisualTokenWithdrawal, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(p_k || p_full) at the last prompt position, shape (batch, L + 1); column L is 0."""
    full_logits, last_hidden = every_layer_last_hidden(withdrawal, inputs)
    log_p_full = torch.log_softmax(full_logits.float(), dim=-1)
    log_p = torch.log_softmax(
        withdrawal.model.get_output_embeddings()(last_hidden).float(), dim=-1
    )  # (L, batch, vocab)
    kl = (log_p.exp() * (log_p - log_p_full.to(log_p.device))).sum(-1).T  # (batch, L)
    return torch.cat([kl, torch.zeros(kl.shape[0], 1, device=kl.device)], dim=1).cpu()


def choose_withdraw_layer(mean_kl: list[float], threshold: float) -> tuple[int, bool]:
    """The first layer whose mean KL is at most ``threshold``; whether a layer before L met it."""
    num_layers = len(mean_kl) - 1
    for layer, value in enumerate(mean_kl[:num_layers]):
        if value <= threshold:
            return layer, True
    return num_layers, False


def summarise(per_subset: dict[str, dict], identity: dict) -> dict:
    """The calibration record from each subset's sample count and per-layer mean KL.

    ``identity`` holds the model, config_hash and kl_threshold the samples were measured with.
    """
    if not per_subset:
        raise ValueError("No calibration samples: nothing to choose K from.")
    counts = torch.tensor([entry["num_samples"] for entry in per_subset.values()], dtype=torch.float64)
    means = torch.tensor([entry["mean_kl"] for entry in per_subset.values()], dtype=torch.float64)
    mean_kl = ((counts[:, None] * means).sum(0) / counts.sum()).tolist()
    threshold = identity["kl_threshold"]
    layer, met = choose_withdraw_layer(mean_kl, threshold)
    return {
        **identity,
        "num_layers": len(mean_kl) - 1,
        "withdraw_layer": layer,
        "threshold_met": met,
        "message": (
            f"K={layer}: the first layer with mean KL <= {threshold}"
            if met
            else f"No layer before {layer} met mean KL <= {threshold}; K={layer} (no withdrawal)"
        ),
        "num_samples": int(counts.sum()),
        "mean_kl": mean_kl,
        "per_subset": dict(sorted(per_subset.items())),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
