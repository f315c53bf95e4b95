"""Choosing the withdrawal layer K the way the VTW paper does: the maths.

For each calibration prompt and each candidate layer k in 0..L: the next-token distribution at
the last prompt position of the unmodified model (p_full) and with withdrawal before layer k
(p_k), and KL(p_k || p_full). With ``kl_tokens`` T > 1 the KL is averaged over that position and
the first T-1 positions of the unmodified model's own greedy answer, teacher-forced, so that
long answers (captions, reading) are judged by more than their first word. K is the smallest k
whose mean KL over the samples is at most the threshold (0.003 by default, the paper's
LLaVA-1.5-7B setting).

All k come from one full forward per batch that keeps every layer's input hidden states, then
each layer j runs once over the kept tokens of all candidates k <= j stacked along the batch (the
reference implementation runs a whole forward per candidate layer).

The lmms-eval task hooks are in ``calibration_task.py``, the file and plot in ``calibration_file.py``.
"""

from __future__ import annotations

import datetime

import torch

from vtw_eval.engine import (
    KeptRotary,
    VisualTokenWithdrawal,
    counted_positions,
    plan_withdrawal,
    with_counted_positions,
)

DEFAULT_KL_THRESHOLD = 0.003


def tile_batch(tensor: torch.Tensor, copies: int, trailing_dims: int) -> torch.Tensor:
    """Repeat along the batch dimension, the one followed by ``trailing_dims`` dimensions."""
    repeats = [1] * tensor.dim()
    repeats[tensor.dim() - 1 - trailing_dims] = copies
    return tensor.repeat(*repeats)


@torch.inference_mode()
def with_greedy_answer(
    withdrawal: VisualTokenWithdrawal, inputs: dict[str, torch.Tensor], kl_tokens: int, eos_token_id: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The prompts followed by the first ``kl_tokens - 1`` tokens of the unmodified model's own
    greedy answer (never the dataset's), and which of the last positions the KL counts.

    Returns the extended inputs and ``counted`` (batch, positions) bool: position 0 is the last
    prompt token; position i > 0 follows answer token i-1 and counts while the answer has not
    ended (no EOS among its first i tokens). Rows whose answer ended early carry padding after it,
    which, being later in the sequence, changes nothing at the positions that count.
    """
    batch = inputs["input_ids"].shape[0]
    if kl_tokens == 1:
        return inputs, torch.ones(batch, 1, dtype=torch.bool)
    saved, withdrawal.withdraw_layer = withdrawal.withdraw_layer, None
    try:
        # A visual token id in the answer would be read as an image slot when the answer is fed
        # back (a trained model does not emit one; a random one may).
        output = withdrawal.model.generate(
            **inputs, max_new_tokens=kl_tokens - 1, do_sample=False, num_beams=1,
            eos_token_id=eos_token_id, pad_token_id=eos_token_id, suppress_tokens=withdrawal.visual_token_ids,
        )  # fmt: skip
    finally:
        withdrawal.withdraw_layer = saved
    answer = output[:, inputs["input_ids"].shape[1] :]
    ended = (answer == eos_token_id).int().cumsum(1) > 0  # True from each row's EOS on
    counted = torch.cat([torch.ones(batch, 1, dtype=torch.bool), ~ended.cpu()], dim=1)
    extended = dict(inputs, input_ids=output)
    # Per-token inputs grow with the answer: attention 1 (causality keeps padding after an EOS
    # from reaching the counted positions), any per-token type ids 0 (text).
    for key, value in inputs.items():
        if key != "input_ids" and value.shape == inputs["input_ids"].shape:
            tail = torch.full_like(answer, 1 if key == "attention_mask" else 0, dtype=value.dtype)
            extended[key] = torch.cat([value, tail.to(value.device)], dim=1)
    return extended, counted


@torch.inference_mode()
def every_layer_last_hidden(
    withdrawal: VisualTokenWithdrawal, inputs: dict[str, torch.Tensor], positions: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """One unmodified forward of ``inputs`` and, from it, for every candidate k in 0..L-1 the
    final-norm hidden states of the last ``positions`` tokens with withdrawal before layer k.

    Returns the unmodified model's logits there (batch, positions, vocab) and the hidden states
    (L, batch, positions, hidden). The forward keeps each layer's input; then each layer j runs
    once, over the kept tokens of all candidates k <= j stacked along the batch, with no KV cache.
    """
    language_model = withdrawal.language_model
    saved, withdrawal.withdraw_layer = withdrawal.withdraw_layer, None
    # The positions the decoder gives each layer (3-row rotary for Qwen2-VL; Gemma 3 gives its
    # sliding and full layers different rotary embeddings).
    layer_kwargs = [{} for _ in language_model.layers]
    captures = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.update(kwargs, layer_args=args), with_kwargs=True
        )
        for layer, seen in zip(language_model.layers, layer_kwargs)
    ]
    try:
        inputs = with_counted_positions(inputs, withdrawal.architecture)  # padded rows as generate numbers them
        # Queries scaled by position (Llama 4) as the engine scales them: from each row's first real token.
        with withdrawal.queries_at(counted_positions(inputs.get("attention_mask"), inputs["input_ids"], 0)):
            full = withdrawal.model(**inputs, output_hidden_states=True, use_cache=False)
    finally:
        for capture in captures:
            capture.remove()
        withdrawal.withdraw_layer = saved
    plan = plan_withdrawal(inputs["input_ids"], inputs.get("attention_mask"), withdrawal.visual_token_ids)
    kept_rotary = KeptRotary(plan, withdrawal.architecture.complex_rotary)
    architecture = withdrawal.architecture
    stored = {}  # keys and values the layers store for the KV-shared ones (Gemma 4), this pass's
    hidden = None
    for index, layer in enumerate(language_model.layers):
        candidate = plan.gather(full.hidden_states[index])  # withdrawal before this layer joins
        hidden = candidate if hidden is None else torch.cat([hidden, candidate.to(hidden.device)], dim=0)
        copies = index + 1
        embeddings, position_ids = kept_rotary(
            layer_kwargs[index]["position_embeddings"], layer_kwargs[index].get("position_ids")
        )
        if withdrawal.architecture.complex_rotary:  # one tensor of rotations (Llama 4)
            embeddings = tile_batch(embeddings, copies, 2)
        else:
            embeddings = tuple(tile_batch(tensor, copies, 2) for tensor in embeddings)
        if position_ids is not None:
            position_ids = tile_batch(position_ids, copies, 1)
        mask_2d = tile_batch(plan.kept_attention_mask, copies, 1)
        slot_positions = tile_batch(plan.kept_counted_positions.to(hidden.device), copies, 1)
        extra = {}
        if architecture.per_layer_input is not None:  # Gemma 4: the layer's per-token input, kept positions
            per_layer_input = layer_kwargs[index].get(architecture.per_layer_input)
            if per_layer_input is None:
                per_layer_input = layer_kwargs[index]["layer_args"][withdrawal.per_layer_input_at]
            if per_layer_input is not None:  # None in models without them (Gemma 4's MoE)
                extra[architecture.per_layer_input] = tile_batch(plan.gather(per_layer_input), copies, 2)
        producer = withdrawal.key_producers[index]
        if architecture.key_sharing is not None:  # layers that store keys for others store them here
            extra[architecture.key_sharing.argument] = stored
        if producer is None:
            mask = withdrawal.layer_mask(index, hidden, mask_2d, None, slot_positions)
        else:  # what a KV-shared layer reads
            mask, extra[architecture.key_sharing.argument] = keys_of_producer(
                withdrawal, plan, index, producer, hidden, slot_positions, stored, layer_kwargs[index]
            )
        with withdrawal.queries_at(slot_positions):  # queries scaled by their own positions (Llama 4)
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=embeddings,
                position_ids=position_ids,
                use_cache=False,
                **extra,
            )
    last = language_model.norm(hidden[:, -positions:])
    batch = plan.kept_positions.shape[0]
    return full.logits[:, -positions:], last.view(withdrawal.num_layers, batch, positions, -1)


def keys_of_producer(
    withdrawal, plan, index: int, producer: int, hidden, slot_positions, stored: dict, seen: dict
) -> tuple:
    """For KV-shared layer ``index`` over the stacked candidates k = 0..index (their queries at
    ``slot_positions``): its attention mask and the keys and values it reads, as the layer takes
    them (by kind). Candidates k <= producer read the keys the producer computed over their kept
    tokens in this pass, placed at those tokens' positions; candidates k > producer read the keys
    of the unmodified forward, every position, the withdrawn ones masked (the engine's rule;
    docs/design.md)."""
    argument = withdrawal.architecture.key_sharing.argument
    kind = withdrawal.layer_kinds[producer]
    prompt_length = plan.prompt_length
    reduced = stored[kind]  # (batch * (producer + 1), heads, kept, head dim), this pass
    full = seen[argument][kind]  # (batch, heads, prompt, head dim), the unmodified forward
    slots = tile_batch(plan.kept_positions, producer + 1, 1).to(reduced[0].device)
    placed = []
    for tensor, unmodified in zip(reduced, full):
        at_positions = tensor.new_zeros(*tensor.shape[:2], prompt_length, tensor.shape[-1])
        at_positions[torch.arange(slots.shape[0], device=slots.device)[:, None], :, slots] = tensor.transpose(1, 2)
        placed.append(torch.cat([at_positions, tile_batch(unmodified, index - producer, 3).to(tensor.device)]))
    copies = index + 1
    left_padding = plan.left_padding.to(hidden.device)[:, None]
    key_positions = torch.arange(prompt_length, device=hidden.device)[None] - left_padding
    mask = withdrawal.mask_over_keys(
        index,
        hidden,
        tile_batch(plan.kept_mask.to(hidden.device), copies, 1),
        slot_positions,
        tile_batch(key_positions, copies, 1),
    )
    return mask, {kind: tuple(placed)}


@torch.inference_mode()
def layer_kl_divergences(
    withdrawal: VisualTokenWithdrawal, inputs: dict[str, torch.Tensor], counted: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p_k || p_full) per row and candidate layer, shape (batch, L + 1); column L is 0.

    Without ``counted``, at the last prompt position (the paper's criterion). With ``counted``
    (batch, positions) from ``with_greedy_answer``, averaged over the last positions it marks.
    """
    if counted is None:
        counted = torch.ones(inputs["input_ids"].shape[0], 1, dtype=torch.bool)
    full_logits, last_hidden = every_layer_last_hidden(withdrawal, inputs, counted.shape[1])
    log_p_full = torch.log_softmax(full_logits.float(), dim=-1)
    head = withdrawal.model.get_output_embeddings()
    weights = counted.to(torch.float32) / counted.sum(1, keepdim=True)
    kl = torch.zeros(counted.shape[0], withdrawal.num_layers + 1)
    for layer, hidden in enumerate(last_hidden):  # one layer at a time: (batch, positions, vocab)
        log_p = torch.log_softmax(head(hidden).float(), dim=-1)
        per_position = (log_p.exp() * (log_p - log_p_full.to(log_p.device))).sum(-1)
        kl[:, layer] = (per_position.cpu() * weights).sum(1)
    return kl


def spread_evenly(count: int, wanted: int) -> range:
    """Indices of ``wanted`` items spread evenly over ``count`` (all of them when fewer)."""
    return range(0, count, max(count // wanted, 1))[:wanted]


def choose_withdraw_layer(mean_kl: list[float], threshold: float) -> tuple[int, bool]:
    """The first layer whose mean KL is at most ``threshold``; whether a layer before L met it."""
    num_layers = len(mean_kl) - 1
    for layer, value in enumerate(mean_kl[:num_layers]):
        if value <= threshold:
            return layer, True
    return num_layers, False


def task_entry(kl_rows: torch.Tensor, kl_threshold: float, kl_tokens: int, task_docs: int, limited: bool) -> dict:
    """One task's calibration entry from its samples' per-layer KL (samples, L + 1), saying how it
    was made: the task's doc count and whether the run saw only part of them (``--limit``)."""
    mean_kl = kl_rows.to(torch.float64).mean(0).tolist()
    layer, met = choose_withdraw_layer(mean_kl, kl_threshold)
    return {
        "withdraw_layer": layer,
        "threshold_met": met,
        "kl_threshold": kl_threshold,
        "kl_tokens": kl_tokens,
        "num_samples": kl_rows.shape[0],
        "task_docs": task_docs,
        "limited": limited,
        "mean_kl": mean_kl,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


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
