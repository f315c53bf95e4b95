"""Tiny checkpoints sized for vLLM's CPU attention (head size 32: it takes 32, 64, 80, ... only) and
saved in the hub's layout, which vLLM 0.32 reads: LLaVA's tower as ``vision_tower.vision_model.*``
(released checkpoints have it; transformers 5 saves ``vision_tower.embeddings.*``, which vLLM 0.32
does not load)."""

from __future__ import annotations

from pathlib import Path

import tiny_models
from safetensors.torch import load_file, save_file


def build_vllm_llava(path: str | Path, num_layers: int = 4, seed: int = 0) -> Path:
    """tiny_models' LLaVA-1.5 with a text model of width 128 (4 heads of 32, 2 key/value heads)."""
    path = tiny_models.build_tiny_llava(path, num_layers=num_layers, seed=seed, text_width=128)
    weights_file = path / "model.safetensors"
    weights = load_file(weights_file)
    renamed = {}
    for name, tensor in weights.items():
        if ".vision_tower." in f".{name}" and ".vision_model." not in name:
            head, tail = name.split("vision_tower.", 1)
            name = f"{head}vision_tower.vision_model.{tail}"
        renamed[name] = tensor
    save_file(renamed, weights_file, metadata={"format": "pt"})
    return path


def build_vllm_qwen2_vl(path: str | Path, version: str = "2.5", num_layers: int = 4, seed: int = 0) -> Path:
    """tiny_models' Qwen2-VL / Qwen2.5-VL with a text model of width 128 (4 heads of 32)."""
    return tiny_models.build_tiny_qwen2_vl(path, version=version, num_layers=num_layers, seed=seed, text_width=128)
