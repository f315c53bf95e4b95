"""Tiny checkpoints sized for vLLM's CPU attention (head size 32: it takes 32, 64, 80, ... only) and
saved in the hub's layout, which vLLM 0.32 reads: LLaVA's tower as ``vision_tower.vision_model.*``
(released checkpoints have it; transformers 5 saves ``vision_tower.embeddings.*``, which vLLM 0.32
does not load)."""

from __future__ import annotations

import json
from pathlib import Path

import tiny_models
import torch

from vtw_eval.small_llava import save_tower_in_hub_layout


def build_vllm_llava(path: str | Path, num_layers: int = 4, seed: int = 0) -> Path:
    """tiny_models' LLaVA-1.5 with a text model of width 128 (4 heads of 32, 2 key/value heads)."""
    path = tiny_models.build_tiny_llava(path, num_layers=num_layers, seed=seed, text_width=128)
    save_tower_in_hub_layout(path)
    return path


def build_vllm_qwen2_vl(path: str | Path, version: str = "2.5", num_layers: int = 4, seed: int = 0) -> Path:
    """tiny_models' Qwen2-VL / Qwen2.5-VL with a text model of width 128 (4 heads of 32)."""
    return tiny_models.build_tiny_qwen2_vl(path, version=version, num_layers=num_layers, seed=seed, text_width=128)


def build_vllm_qwen3_vl(path: str | Path, num_layers: int = 6, seed: int = 0) -> Path:
    """tiny_models' Qwen3-VL (DeepStack after decoder layers 0, 1, 2) with a text model of width 128."""
    return tiny_models.build_tiny_qwen3(path, "qwen3_vl", num_layers=num_layers, seed=seed, text_width=128)


# The prompts the exactness tests send in one batch: no image, one, two (text-only requests beside
# image requests, several images per request).
QUESTIONS = [("what is here?", 1), ("describe it", 0), ("compare these two", 2), ("and this one?", 1)]
NEW_TOKENS = 16


def prompts(processor) -> list[tuple[str, list]]:
    """Each request's chat prompt and pictures (distinct per request)."""
    return [
        (tiny_models.prompt(processor, text, count), [tiny_models.picture(10 * i + j) for j in range(count)])
        for i, (text, count) in enumerate(QUESTIONS)
    ]


def vllm_greedy(path: str, withdraw_layer: int | None, max_num_batched_tokens: int = 2048) -> list[list[int]]:
    """Greedy tokens of every request of ``prompts`` from vLLM in one batch (float32, eager, no prefix
    caching), with VTW's worker when ``withdraw_layer`` is given; in this process."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from vtw_eval.vllm_worker import WITHDRAW_LAYER_KEY, worker_class_path

    extra = {}
    if withdraw_layer is not None:
        extra = dict(worker_cls=worker_class_path(), additional_config={WITHDRAW_LAYER_KEY: withdraw_layer})
    llm = LLM(
        model=path, dtype="float32", enforce_eager=True, enable_prefix_caching=False, max_model_len=256, seed=0,
        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=8, **extra,
    )  # fmt: skip
    requests = []
    for text, images in prompts(AutoProcessor.from_pretrained(path)):
        request = {"prompt": text}
        if images:
            request["multi_modal_data"] = {"image": images}
        requests.append(request)
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    return [list(output.outputs[0].token_ids) for output in outputs]


def transformers_greedy(path: str, withdraw_layer: int | None) -> list[list[int]]:
    """The same requests one at a time through vtw_eval's transformers engine (float32)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    tiny_models.withdrawal(model, withdraw_layer)
    tokens = []
    for text, images in prompts(processor):
        inputs = processor(images=images or None, text=[text], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        tokens.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    return tokens


if __name__ == "__main__":  # vLLM spawns processes: its runs start from here, one engine per process
    import sys

    arguments = json.loads(sys.argv[1])
    print("VLLM_TOKENS " + json.dumps(vllm_greedy(**arguments)))
