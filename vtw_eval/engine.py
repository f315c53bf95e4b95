"""Visual Tokens Withdrawal (VTW, arXiv 2405.05803) on an unmodified transformers model.

Layers 0..K-1 of the language decoder run on the whole sequence. Before layer K every visual
token is withdrawn, so layers K..L-1 and the final norm run on the remaining tokens only.
Kept tokens keep their original position ids; layers < K cache every token, layers >= K cache
the kept tokens only, and decoding steps attend to whatever their layer cached.

The engine is two kinds of forward pre-hook, nothing copied from or patched into transformers:

* on the multimodal model: reads ``input_ids`` and the 2D attention mask of every call. A call
  on an empty cache (prefill) plans the withdrawal for the batch; a later call (decoding step)
  extends the plan's attention mask with the new tokens.
* on each decoder layer: a layer >= K gets the kept positions' hidden states (the first
  withdrawn layer only, during prefill), position embeddings and position ids, and an attention
  mask built by transformers' own mask functions for the reduced sequence and KV cache.
* on the language model, for architectures that declare one: visual features that the decoder
  adds at the visual positions after its first layers (Qwen3-VL's DeepStack) are kept for the
  layers before K only: after withdrawal there is no visual position left to add them to.

Recurrent layers that an architecture declares (Qwen3.5's Gated DeltaNet ``linear_attention``)
carry a convolution and a recurrent state instead of keys and values. From K on they run over
the kept tokens in order, so their states hold the text only, and decoding continues those
states; the spare slots of a row that keeps fewer tokens get the 2D padding mask transformers
gives such layers for left padding (the layer zeroes those positions, so they leave the states
untouched).

Positions the attention counts itself follow the kept tokens' own: sliding windows and Llama 4's
chunks are masked by them, and queries that a layer scales by the position it counts (Llama 4's
NoPE layers; declared by the adapter) are rescaled to them by a forward hook on that layer's
``q_proj``.

A second per-token input of each layer (Gemma 4's per-layer inputs) is gathered at the kept
positions with the hidden states. Layers that read the keys and values an earlier layer stored in
the same forward (Gemma 4's KV-shared layers; declared by the adapter) attend to what that layer
cached: the kept tokens if it is >= K, else every token with the withdrawn ones masked, so that a
token withdrawn before K is seen by no layer from K on (docs/design.md). In prefill transformers
may give those layers the last prompt position only (``generate``); it is kept, and stays as given.

Which positions go is a plan built from a keep mask (per row, any ordered subset of the prompt's
positions). VTW keeps every text position; another method gives a ``KeepSelector``, asked at the
first withdrawn layer of each prefill, after the layers before it ran (so it may use what its own
hooks saw there, e.g. a layer's queries and keys). Everything below follows any such subset.

All state lives on one ``VisualTokenWithdrawal`` object per model and describes the current
batch only.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
)

from vtw_eval.architecture import Architecture, language_model_of


@dataclass
class WithdrawalPlan:
    """Which positions of a prefill batch survive withdrawal.

    Rows keep different numbers of tokens when they hold different numbers of visual tokens, so
    each row's kept positions are right-aligned, in order, in ``n_kept`` slots; the spare slots on
    the left point at withdrawn positions and are masked out exactly like left padding.
    """

    visual_mask: torch.Tensor  # (batch, prompt_length) bool, True at visual tokens
    kept_positions: torch.Tensor  # (batch, n_kept) long, original indices
    kept_attention_mask: torch.Tensor  # (batch, n_kept) bool, False at spare slots and padding
    prompt_length: int
    num_removed: torch.Tensor  # (batch,) long: the prompt tokens each row withdraws (padding not counted)
    left_padding: torch.Tensor  # (batch,) long: each row's padding tokens before its first real one

    @property
    def kept_counted_positions(self) -> torch.Tensor:
        """(batch, n_kept): each kept slot's position counted from its row's first real token."""
        return self.kept_positions - self.left_padding[:, None].to(self.kept_positions.device)

    @property
    def kept_mask(self) -> torch.Tensor:
        """(batch, prompt_length) bool: True at the real positions that stay."""
        kept = torch.zeros(self.visual_mask.shape, dtype=torch.bool, device=self.kept_positions.device)
        return kept.scatter(1, self.kept_positions, self.kept_attention_mask.to(kept.device))

    @property
    def batch_rows(self) -> torch.Tensor:
        """Row index for advanced indexing together with ``kept_positions``."""
        return torch.arange(self.kept_positions.shape[0], device=self.kept_positions.device)[:, None]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Select the kept positions of a (..., batch or 1, prompt_length, features) tensor."""
        batch = self.kept_positions.shape[0]
        tensor = tensor.expand(*tensor.shape[:-3], batch, *tensor.shape[-2:])
        # The indices go where the tensor is: with device_map a layer may sit on another device.
        rows, positions = self.batch_rows.to(tensor.device), self.kept_positions.to(tensor.device)
        return tensor[..., rows, positions, :]


class KeptRotary:
    """The kept positions' rotary embeddings and position ids, gathered once per embedding: the
    decoder gives every layer the same tensors (Gemma 3 one per kind of layer), and a layer over
    few kept tokens is short enough that a few extra small kernels per layer show (0.23 -> 0.05 ms
    per layer on CPU). The embeddings are a (cos, sin) pair, or one complex tensor of rotations
    (``complex_rotary``, Llama 4)."""

    def __init__(self, plan: WithdrawalPlan, complex_rotary: bool = False):
        self.plan, self.complex_rotary = plan, complex_rotary
        self._kept: dict[int, tuple] = {}  # id(first tensor) -> (it, kept embeddings, kept position ids)

    def __call__(self, position_embeddings, position_ids: torch.Tensor | None = None) -> tuple:
        """(kept embeddings in the form given, kept position ids or None)."""
        first = position_embeddings if self.complex_rotary else position_embeddings[0]
        kept = self._kept.get(id(first))
        if kept is None or kept[0] is not first:
            kept_ids = None if position_ids is None else self.plan.gather(position_ids[..., None])[..., 0]
            if self.complex_rotary:
                embeddings = self.plan.gather(position_embeddings)
            else:
                embeddings = tuple(self.plan.gather(tensor) for tensor in position_embeddings)
            kept = self._kept[id(first)] = (first, embeddings, kept_ids)
        return kept[1:]


def cache_in(mapping) -> object | None:
    """The KV cache in a forward's keyword arguments or in a model output: transformers 5.24 names
    it ``cache``, 5.23 ``past_key_values``."""
    cache = mapping.get("cache")
    return cache if cache is not None else mapping.get("past_key_values")


def with_counted_positions(inputs: dict, architecture: Architecture) -> dict:
    """``inputs`` for a forward outside ``generate`` of a family whose positions are counted
    (``decoding_positions="count"``): position ids counted from each row's first real token, as
    ``generate`` numbers a left-padded prompt. Without them the model would number the padding
    too, which rotary embeddings do not see (relative) but a query scaled by its absolute position
    does (Ministral 3), so a padded row would differ from the same prompt alone."""
    mask = inputs.get("attention_mask")
    if architecture.decoding_positions != "count" or mask is None or "position_ids" in inputs:
        return inputs
    return {**inputs, "position_ids": counted_positions(mask, inputs["input_ids"], 0)}


def cache_bytes(cache) -> int:
    """Bytes a transformers cache holds: keys and values of attention layers, the convolution and
    recurrent states of linear-attention layers."""
    tensors = []
    for layer in cache.layers:
        if hasattr(layer, "recurrent_states"):
            tensors += [*layer.conv_states.values(), *layer.recurrent_states.values()]
        else:
            tensors += [layer.keys, layer.values]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward takes a KV cache (``cache`` from transformers 5.24,
    where ``past_key_values`` is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def plan_from_keep_mask(
    keep: torch.Tensor, attention_mask: torch.Tensor | None, visual_mask: torch.Tensor
) -> WithdrawalPlan:
    """The plan that keeps the positions where ``keep`` (batch, prompt_length) is True, in order.
    The last prompt position must stay: the next token is predicted from it."""
    if not keep[:, -1].all():
        raise ValueError("A plan withdraws the last prompt position; the next token is predicted from it.")
    real = torch.ones_like(keep) if attention_mask is None else attention_mask.to(torch.bool)
    n_kept = int(keep.sum(dim=1).max())
    # A stable sort puts each row's withdrawn positions first and its kept positions last, in order.
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)
    kept_positions = order[:, -n_kept:]
    kept_attention_mask = keep.gather(1, kept_positions) & real.gather(1, kept_positions)
    num_removed = (~keep & real).sum(dim=1)
    left_padding = (real.cumsum(dim=1) == 0).sum(dim=1)
    return WithdrawalPlan(visual_mask, kept_positions, kept_attention_mask, keep.shape[1], num_removed, left_padding)


def visual_positions(input_ids: torch.Tensor, visual_token_ids: list[int]) -> torch.Tensor:
    """(batch, length) bool, True where a token id is a visual one."""
    return torch.isin(input_ids, torch.tensor(visual_token_ids, device=input_ids.device))


def plan_withdrawal(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, visual_token_ids: list[int]
) -> WithdrawalPlan:
    """VTW's plan for a prompt batch, its visual positions found by token id."""
    return vtw_plan(visual_positions(input_ids, visual_token_ids), attention_mask)


def vtw_plan(visual_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> WithdrawalPlan:
    """VTW's plan from the batch's visual positions: they go, every other position stays."""
    if visual_mask[:, -1].any():
        raise ValueError(
            "A prompt ends with a visual token; VTW predicts from the last prompt token, which must be text."
        )
    return plan_from_keep_mask(~visual_mask, attention_mask, visual_mask)


class KeepSelector(Protocol):
    """Which prompt positions stay when withdrawal is not VTW's (all visual positions go): called
    at the first withdrawn layer of a prefill with the batch's visual mask and 2D attention mask
    (batch, prompt_length) and that layer's input hidden states; returns a (batch, prompt_length)
    bool keep mask, True at every position that stays: any subset, in order, that keeps the last
    prompt position (the next token is predicted from it)."""

    def __call__(
        self, visual_mask: torch.Tensor, attention_mask: torch.Tensor | None, hidden_states: torch.Tensor
    ) -> torch.Tensor: ...


class AttentionObserver(Protocol):
    """A keep selector that ranks by an earlier layer's attention (FastV): the engine calls
    ``observe_attention(attention_module, inputs)`` during each prefill with visual tokens, with the
    keyword inputs of decoder layer ``attention_layer``'s attention module (its normed
    ``hidden_states``, ``position_embeddings``, ``attention_mask``), before the first withdrawn layer."""

    attention_layer: int

    def observe_attention(self, attention: nn.Module, inputs: dict) -> None: ...


# The layer types of ``config.layer_types`` whose masks are causal over the KV cache, by the
# transformers function that builds them; a recurrent type maps to the 2D padding mask.
# A chunked layer's mask is the causal one narrowed to the chunks of the kept tokens' own positions.
WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")  # their masks need each slot's position
ATTENTION_MASKS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
    "chunked_attention": create_causal_mask,
}


class VisualTokenWithdrawal:
    """Withdraws visual tokens before decoder layer ``withdraw_layer`` of one model.

    ``withdraw_layer`` may be changed at any time between calls; ``None`` or the layer count
    means no withdrawal (the model runs bit-identically to the unmodified one).

        vtw = VisualTokenWithdrawal(model, 16, VTWQwen2VL.architecture)
        model.generate(**inputs)      # withdrawal on
        vtw.remove()                  # hooks gone

    ``architecture`` is what the model family's adapter declares (``vtw_eval.architecture``):
    how decoding positions are numbered, which visual features the decoder adds between layers,
    which layers are recurrent, which token ids are visual. ``keep_selector`` chooses which
    positions stay (default: VTW, every text position; see ``KeepSelector``).
    """

    def __init__(
        self,
        model: nn.Module,
        withdraw_layer: int | None,
        architecture: Architecture = Architecture(),
        keep_selector: KeepSelector | None = None,
    ):
        self.model = model
        self.architecture = architecture
        self.language_model = language_model_of(model)
        self.layer_kinds = architecture.layer_kinds(model)  # refuses a type it cannot mask
        self.num_layers = len(self.language_model.layers)
        self.visual_token_ids = architecture.visual_token_ids(model.config)
        self._observer_handle = None
        self.keep_selector = keep_selector
        self.withdraw_layer = withdraw_layer
        self.plan: WithdrawalPlan | None = None  # of the current batch; None when nothing is withdrawn
        self._visual_mask: torch.Tensor | None = None  # of the current prefill, until the plan is made
        self._prompt_mask: torch.Tensor | None = None  # its 2D attention mask
        self._seen_tokens = 0  # full-sequence length processed so far in the current batch
        self._prefill = False  # whether the current call is the batch's prefill
        self._reduced_2d_mask: torch.Tensor | None = None  # for the current call, over the reduced cache
        self._layer_masks: dict = {}  # built once per call and mask kind (or producer of shared keys)
        self._kept_rotary: KeptRotary | None = None  # of the current plan
        self._late_features: list = []  # injected visual features of layers >= K (prefill)
        self._cache = None  # the KV cache of the current call
        self._call_positions: torch.Tensor | None = None  # its tokens' positions from each row's first real one
        self._queries_at: torch.Tensor | None = None  # set by queries_at: positions of direct layer calls
        self._full_2d_mask: torch.Tensor | None = None  # the call's 2D mask over every token seen
        self.key_producers = architecture.key_producers(self.language_model.config)
        # Where a layer takes its per-token second input when it comes positionally.
        self.per_layer_input_at = None
        if architecture.per_layer_input is not None:
            parameters = list(inspect.signature(self.language_model.layers[0].forward).parameters)
            self.per_layer_input_at = parameters.index(architecture.per_layer_input)
        self._handles = [model.register_forward_pre_hook(self._before_model_call, with_kwargs=True)]
        for index, layer in enumerate(self.language_model.layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_layer_hook(index), with_kwargs=True))
        if architecture.injected_visual_features is not None:
            self._handles.append(
                self.language_model.register_forward_pre_hook(self._before_language_model, with_kwargs=True)
            )
            for index, layer in enumerate(self.language_model.layers):
                self._handles.append(layer.register_forward_hook(self._make_injection_hook(index)))
        if architecture.query_position_scale is not None:
            for index, layer in enumerate(self.language_model.layers):
                scale = architecture.query_position_scale(layer.self_attn)
                if scale is not None:
                    hook = self._make_query_scale_hook(index, scale)
                    self._handles.append(layer.self_attn.q_proj.register_forward_hook(hook))

    @property
    def keep_selector(self) -> KeepSelector | None:
        return self._keep_selector

    @keep_selector.setter
    def keep_selector(self, selector: KeepSelector | None) -> None:
        """A selector that observes an earlier layer's attention gets a hook on that attention module."""
        if self._observer_handle is not None:
            self._observer_handle.remove()
            self._observer_handle = None
        self._keep_selector = selector
        layer = getattr(selector, "attention_layer", None)
        if layer is not None:
            attention = self.language_model.layers[layer].self_attn
            self._observer_handle = attention.register_forward_pre_hook(self._observe_attention, with_kwargs=True)

    def _observe_attention(self, module, args, kwargs):
        if self._visual_mask is not None and self._prefill and self.active:
            self._keep_selector.observe_attention(module, kwargs)

    @property
    def withdraw_layer(self) -> int | None:
        return self._withdraw_layer

    @withdraw_layer.setter
    def withdraw_layer(self, value: int | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.num_layers
        ):
            raise ValueError(f"withdraw_layer must be an integer in 0..{self.num_layers} or None, got {value!r}")
        self._withdraw_layer = value

    @property
    def active(self) -> bool:
        return self._withdraw_layer is not None and self._withdraw_layer < self.num_layers

    def remove(self) -> None:
        self.keep_selector = None
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _start_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """A prefill: find the visual positions; the plan is made at the first withdrawn layer."""
        self.plan, self._prefill, self._seen_tokens = None, True, input_ids.shape[1]
        self._visual_mask, self._prompt_mask = None, attention_mask
        visual_mask = visual_positions(input_ids, self.visual_token_ids)
        if not visual_mask.any():  # a text-only batch runs as the unmodified model
            return
        self._visual_mask = visual_mask
        if self.keep_selector is None:  # VTW decides from the prompt alone
            self._set_plan(vtw_plan(visual_mask, attention_mask))

    def _set_plan(self, plan: WithdrawalPlan) -> None:
        self.plan, self._kept_rotary = plan, KeptRotary(plan, self.architecture.complex_rotary)
        self._reduced_2d_mask = plan.kept_attention_mask

    # -- the model-level hook: plan at prefill, extend the mask at decoding steps ---------------

    def _before_model_call(self, module, args, kwargs):
        self._layer_masks, self._late_features = {}, []
        if not self.active:
            self.plan = self._visual_mask = None
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("VTW needs input_ids to find the visual tokens; got inputs_embeds only.")
        attention_mask = kwargs.get("attention_mask")
        cache = cache_in(kwargs)
        new_tokens = input_ids.shape[1]
        self._cache = cache
        self._full_2d_mask = attention_mask
        prefill = cache is None or cache.get_seq_length() == 0
        if self.architecture.query_position_scale is not None:  # only its query-scale hooks read them
            seen = 0 if prefill else self._seen_tokens
            self._call_positions = counted_positions(attention_mask, input_ids, seen)

        if prefill:  # prefill, or a forward without cache
            self._start_batch(input_ids, attention_mask)
            return None

        self._prefill = False
        if self.plan is None:  # decoding a text-only batch: nothing to do
            self._seen_tokens += new_tokens
            return None
        # Tokens after the prompt are text: a generated image-token id carries no visual features.
        if input_ids.shape[0] != self.plan.kept_positions.shape[0]:
            raise ValueError("The decoding batch does not match the batch whose withdrawal was planned.")
        # The kept prompt slots, then every token after the prompt (generated or appended).
        after_prompt = self._seen_tokens + new_tokens - self.plan.prompt_length
        if attention_mask is None:
            tail = torch.ones(input_ids.shape[0], after_prompt, dtype=torch.bool, device=input_ids.device)
        else:
            tail = attention_mask[:, -after_prompt:].to(torch.bool)
        self._reduced_2d_mask = torch.cat([self.plan.kept_attention_mask, tail], dim=1)
        if kwargs.get("position_ids") is None:
            total = self._seen_tokens + new_tokens
            if self.architecture.decoding_positions == "count":
                positions = torch.arange(self._seen_tokens, total, device=input_ids.device)
                kwargs = {**kwargs, "position_ids": positions[None].expand(input_ids.shape[0], -1)}
            elif attention_mask is None:
                full_mask = torch.ones(input_ids.shape[0], total, dtype=torch.long, device=input_ids.device)
                kwargs = {**kwargs, "attention_mask": full_mask}
        self._seen_tokens += new_tokens
        return args, kwargs

    # -- injected visual features (DeepStack) ------------------------------------------------

    def _before_language_model(self, module, args, kwargs):
        """The decoder adds the entries of layers before K itself; those of layers >= K would
        meet a reduced sequence, so the engine adds them at the kept visual positions (none for
        VTW) after those layers (prefill)."""
        name = self.architecture.injected_visual_features
        features = kwargs.get(name)
        if self._visual_mask is None or not self._prefill or features is None:
            return None
        self._late_features = list(features)[self._withdraw_layer :]
        return args, {**kwargs, name: list(features)[: self._withdraw_layer]}

    def _make_injection_hook(self, layer_index: int):
        def hook(module, args, output):
            late = layer_index - self._withdraw_layer if self.active else -1
            if self.plan is None or not self._prefill or not 0 <= late < len(self._late_features):
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            slots, rows = self._kept_visual_rows(hidden.device)
            if not slots.any():  # VTW: no visual position left
                return None
            hidden = hidden.clone()
            hidden[slots] += self._late_features[late].to(hidden.device, hidden.dtype)[rows]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _kept_visual_rows(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots of the reduced sequence that hold a kept visual token, and each one's row among
        the batch's visual tokens (row-major, as injected features list them)."""
        visual, kept = self.plan.visual_mask.to(device), self.plan.kept_positions.to(device)
        rank = (visual.flatten().cumsum(0) - 1).view_as(visual)
        slots = visual.gather(1, kept) & self.plan.kept_attention_mask.to(device)
        return slots, rank.gather(1, kept)[slots]

    # -- the layer-level hooks ---------------------------------------------------------------

    def _make_layer_hook(self, layer_index: int):
        def hook(module, args, kwargs):
            if self._visual_mask is None or not self.active or layer_index < self._withdraw_layer:
                return None
            return self._withdrawn_layer_inputs(layer_index, args, kwargs)

        return hook

    def _withdrawn_layer_inputs(self, layer_index: int, args, kwargs):
        args = list(args)
        hidden = args[0] if args else kwargs["hidden_states"]
        producer = self.key_producers[layer_index]
        last_only = None  # prefill inputs cut to the last positions by the decoder (KV-shared layers)
        if self._prefill:
            if layer_index == self._withdraw_layer and self.keep_selector is not None:
                # Decided now, from what the layers before saw.
                keep = self.keep_selector(self._visual_mask, self._prompt_mask, hidden)
                keep = keep.to(self._visual_mask.device, torch.bool)  # where the prompt is, as VTW's plan
                self._set_plan(plan_from_keep_mask(keep, self._prompt_mask, self._visual_mask))
            if producer is not None:
                last_only = self._cut_to_last_positions(kwargs["position_embeddings"])
            if last_only is None:
                if layer_index == self._withdraw_layer:
                    hidden = self.plan.gather(hidden)
                embeddings, position_ids = self._kept_rotary(kwargs["position_embeddings"], kwargs.get("position_ids"))
                kwargs["position_embeddings"] = embeddings
                if position_ids is not None:
                    kwargs["position_ids"] = position_ids
                self._gather_per_layer_input(args, kwargs)
        if producer is None:
            kwargs["attention_mask"] = self._mask_for(layer_index, hidden, cache_in(kwargs))
        else:
            kwargs["attention_mask"] = self._shared_keys_mask(layer_index, producer, hidden, kwargs, last_only)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return tuple(args), kwargs

    def _gather_per_layer_input(self, args: list, kwargs: dict) -> None:
        """The layer's second per-token input (Gemma 4's per-layer input) at the kept positions."""
        name, at = self.architecture.per_layer_input, self.per_layer_input_at
        if name is None:
            return
        if kwargs.get(name) is not None:
            kwargs[name] = self.plan.gather(kwargs[name])
        elif len(args) > at and args[at] is not None:
            args[at] = self.plan.gather(args[at])

    def _cut_to_last_positions(self, position_embeddings) -> int | None:
        """How many last prompt positions a prefill layer was given, when the decoder cut its inputs
        to them (Gemma 4 gives its KV-shared layers only the positions whose logits are kept); None
        when it was given the whole prompt. Those positions must all be kept."""
        first = position_embeddings if self.architecture.complex_rotary else position_embeddings[0]
        given, prompt_length = first.shape[-2], self.plan.prompt_length
        if given == prompt_length:
            return None
        kept = self.plan.kept_positions
        last = torch.arange(prompt_length - given, prompt_length, device=kept.device)
        if given > kept.shape[1] or not bool((kept[:, -given:] == last).all()):
            raise ValueError(
                f"The decoder gave its KV-shared layers the last {given} prompt positions, and some of them "
                "are withdrawn; ask for the logits of the last position only (logits_to_keep=1) or of all."
            )
        return given

    def _mask_for(self, layer_index: int, hidden: torch.Tensor, cache) -> torch.Tensor | None:
        """The attention mask of a withdrawn layer, built once per call and mask kind."""
        kind = self.layer_kinds[layer_index]
        if kind not in self._layer_masks:
            mask_2d = self._reduced_2d_mask.to(hidden.device)
            positions = self._slot_positions(hidden.device) if kind in WINDOWED_LAYER_TYPES else None
            self._layer_masks[kind] = self.layer_mask(layer_index, hidden, mask_2d, cache, positions)
        return self._layer_masks[kind]

    def _slot_positions(self, device: torch.device) -> torch.Tensor:
        """The position of each slot of the current call's reduced sequence, counted from its row's
        first real token: the kept prompt positions, then every token after the prompt, in order."""
        kept = self.plan.kept_counted_positions.to(device)
        after_prompt = self._reduced_2d_mask.shape[1] - kept.shape[1]
        start = self.plan.prompt_length - self.plan.left_padding.to(device)[:, None]
        return torch.cat([kept, start + torch.arange(after_prompt, device=device)[None]], dim=1)

    def _shared_keys_mask(self, layer_index: int, producer: int, hidden: torch.Tensor, kwargs, last_only):
        """The attention mask of a withdrawn layer that reads the keys layer ``producer`` stored in
        this call: over the tokens the producer cached (the kept ones if it is >= K, else every
        one, the withdrawn masked), causal and windowed by each token's position (built once per
        call and producer)."""
        if ("keys of", producer) in self._layer_masks:
            return self._layer_masks[("keys of", producer)]
        device = hidden.device
        left_padding = self.plan.left_padding.to(device)[:, None]
        if producer >= self._withdraw_layer:  # it cached the reduced sequence
            key_positions, key_mask = self._slot_positions(device), self._reduced_2d_mask.to(device)
        else:  # it cached every token: those withdrawn are masked
            batch = self.plan.kept_positions.shape[0]
            key_positions = torch.arange(self._seen_tokens, device=device)[None] - left_padding
            full = self._full_2d_mask
            full = torch.ones(batch, self._seen_tokens, device=device) if full is None else full.to(device)
            key_mask = torch.cat([self.plan.kept_mask.to(device), full[:, self.plan.prompt_length :].bool()], dim=1)
        stored = kwargs[self.architecture.key_sharing.argument][self.layer_kinds[producer]][0].shape[-2]
        key_positions, key_mask = key_positions[:, -stored:], key_mask[:, -stored:]  # a sliding layer: its window
        queries = hidden.shape[1]
        if self._prefill and last_only is None:
            query_positions = self.plan.kept_counted_positions.to(device)
        else:  # the last prompt positions, or a decoding step's new tokens
            end = self.plan.prompt_length if self._prefill else self._seen_tokens
            query_positions = torch.arange(end - queries, end, device=device)[None] - left_padding
        mask = self.mask_over_keys(layer_index, hidden, key_mask, query_positions, key_positions)
        self._layer_masks[("keys of", producer)] = mask
        return mask

    def mask_over_keys(
        self,
        layer_index: int,
        hidden: torch.Tensor,
        key_mask: torch.Tensor,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
    ):
        """The attention mask of decoder layer ``layer_index`` whose queries (``hidden``, (batch,
        queries, features), at ``query_positions``) attend to keys of another sequence (at
        ``key_positions``, (batch, keys); ``key_mask`` False at the keys none may see): causal by
        position, within the window of a sliding layer, built by transformers' mask builder in the
        format the layer wants."""
        kind = self.layer_kinds[layer_index]
        window = self.language_model.config.sliding_window if kind == "sliding_attention" else None
        return create_bidirectional_mask(
            self.language_model.config,
            hidden,
            key_mask,
            and_mask_function=causal_by_positions(query_positions, key_positions, window),
        )

    # -- queries scaled by positions the attention counts itself (Llama 4's NoPE layers) ------

    @contextmanager
    def queries_at(self, positions: torch.Tensor):
        """Within it, decoder layers called directly (no cache) over ``positions`` (batch, tokens),
        counted from each row's first real token, get their queries scaled for those positions
        (calibration's one-pass KL runs the layers over kept tokens itself)."""
        self._queries_at = positions
        try:
            yield
        finally:
            self._queries_at = None

    def _make_query_scale_hook(self, layer_index: int, scale):
        def hook(module, args, output):
            positions = self._query_positions(layer_index)
            if positions is None:
                return None
            cache = None if self._queries_at is not None else self._cache
            # What the attention counts: its layer's cache length, then one per token of the call.
            cached = cache.get_seq_length(layer_index) if cache is not None else 0
            counted = torch.arange(cached, cached + output.shape[1], device=output.device)
            ratio = scale(positions.to(output.device)) / scale(counted)[None]
            return output * ratio[..., None].to(output.dtype)

        return hook

    def _query_positions(self, layer_index: int) -> torch.Tensor | None:
        """The positions of the queries of the current call of a layer (batch, tokens), or None
        where the layer runs as in the unmodified model."""
        if self._queries_at is not None:
            return self._queries_at
        if not self.active or self._call_positions is None:
            return None
        if self.plan is not None and self._prefill and layer_index >= self._withdraw_layer:
            return self.plan.kept_counted_positions
        return self._call_positions

    def layer_mask(
        self, layer_index: int, hidden: torch.Tensor, mask_2d: torch.Tensor, cache, positions: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The attention mask of decoder layer ``layer_index`` over a reduced sequence: built by
        transformers' own mask functions, in the format the layer wants, sized against that
        layer's cache (which holds the kept tokens only) or against no cache.

        ``hidden`` is the layer's input (batch, tokens, features); ``mask_2d`` (batch, cached + tokens)
        is False at padding and at the spare slots of rows that kept fewer tokens; ``positions`` (the
        same shape; needed by sliding-window and chunked layers only) is each slot's position counted
        from its row's first real token, by which their window or chunk counts."""
        config = self.language_model.config
        kind = self.layer_kinds[layer_index]
        if kind in self.architecture.recurrent_layer_types:  # the 2D padding mask of the new tokens, or None
            return create_recurrent_attention_mask(config, hidden, mask_2d, cache)
        window = {}
        if kind == "sliding_attention":
            window["and_mask_function"] = original_position_window(positions, config.sliding_window)
        elif kind == "chunked_attention":
            window["and_mask_function"] = original_position_chunks(positions, config.attention_chunk_size)
        # The cache goes by position: its keyword is `cache` from transformers 5.24, `past_key_values` before.
        layer_idx = layer_index if cache is not None else None
        return ATTENTION_MASKS[kind](config, hidden, mask_2d, cache, layer_idx=layer_idx, **window)


def original_position_chunks(positions: torch.Tensor, chunk_size: int):
    """A mask function for transformers' mask builders: a query sees a key only if both sit in the
    same chunk of ``chunk_size`` positions, counted from the row's first real token as transformers'
    own chunked masks count them (``positions``: (batch, slots), each slot's position). Counting
    kept slots instead would move the chunk borders by the withdrawn tokens."""

    def same_chunk(batch_idx, head_idx, q_idx, kv_idx):
        return positions[batch_idx, kv_idx] // chunk_size == positions[batch_idx, q_idx] // chunk_size

    return same_chunk


def causal_by_positions(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None):
    """A mask function for transformers' mask builders over explicit positions: query q sees key
    kv if the key's position is at most the query's (and, with ``window``, within it). Both are
    (batch, slots) in one numbering; used where queries and keys are different sequences (a
    withdrawn layer reading the keys of a layer that kept every token)."""

    def visible(batch_idx, head_idx, q_idx, kv_idx):
        query, key = query_positions[batch_idx, q_idx], key_positions[batch_idx, kv_idx]
        seen = key <= query
        return seen & (key > query - window) if window is not None else seen

    return visible


def counted_positions(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, seen: int) -> torch.Tensor:
    """(batch, new tokens): the positions of a call's tokens counted from each row's first real
    token, from the 2D attention mask over everything seen (as ``generate`` numbers them); without
    a mask, from ``seen``, the tokens before the call."""
    new_tokens = input_ids.shape[1]
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.arange(seen, seen + new_tokens, device=input_ids.device)[None].expand(input_ids.shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_tokens:]


def original_position_window(positions: torch.Tensor, window: int):
    """A mask function for transformers' mask builders: a query sees a key only if the key's
    original position is within ``window`` of the query's. ``positions`` (batch, slots) maps each
    slot of the reduced sequence to its original position. Withdrawn tokens sit between kept ones,
    so slot distances are at most position distances: this narrows the builders' own window (which
    counts slots) to exactly the unmodified model's, less the withdrawn tokens."""

    def within_window(batch_idx, head_idx, q_idx, kv_idx):
        return positions[batch_idx, kv_idx] > positions[batch_idx, q_idx] - window

    return within_window
