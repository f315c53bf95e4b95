"""Loading a checkpoint of a family an adapter serves, with its processor."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor


def load_config(
    backend: str, model_classes: dict[str, type], pretrained: str, revision: str = "main", trust_remote_code=False
):
    """The checkpoint's config (nothing heavy loaded yet), if an adapter's ``model_classes`` serve its
    ``model_type`` (``backend`` names the adapter in refusals)."""
    if not Path(pretrained).expanduser().is_dir() and (
        pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
    ):
        raise ValueError(f"pretrained={pretrained!r} is not accepted: no such directory, and not a hub id (org/name)")
    config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    if config.model_type not in model_classes:
        raise ValueError(
            f"pretrained={pretrained!r} is a {config.model_type!r} model; {backend} serves {sorted(model_classes)}"
        )
    return config


def load_model_and_processor(
    model_class: type,
    pretrained: str,
    device: torch.device,
    revision: str = "main",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: str | None = None,
) -> tuple[torch.nn.Module, object, torch.device]:
    """The model (of ``model_class``) in eval mode on ``device`` or split by ``device_map``, its
    processor with a left-padding tokenizer (batched generation continues every row at the right
    end), and where inputs go (with ``device_map``, the first layer's device)."""
    load_kwargs = dict(revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    if device_map:  # e.g. "auto": one process, the model split over several devices
        load_kwargs["device_map"] = device_map
    model = model_class.from_pretrained(pretrained, **load_kwargs).eval()
    if device_map:
        device = model.device
    else:
        model.to(device)
    processor = AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"
    return model, processor, device
