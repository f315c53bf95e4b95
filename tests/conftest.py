"""Shared fixtures: tiny random llava-hf checkpoints built from configs, offline."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# What the backends write by default (calibration files, accounting) goes to a folder of the
# test session, never into the user's own cache (vtw_eval.files.cache_dir).
os.environ.setdefault("VTW_EVAL_CACHE", tempfile.mkdtemp(prefix="vtw_eval_cache_"))

import pytest
import torch
from PIL import Image, ImageDraw
from tiny_models import build_tiny_llava
from transformers import AutoProcessor, LlavaForConditionalGeneration

NUM_LAYERS = 4


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), num_layers=NUM_LAYERS, seed=0)


@pytest.fixture(scope="session")
def processor(tiny_llava_path):
    processor = AutoProcessor.from_pretrained(tiny_llava_path)
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(path, attn_implementation: str = "sdpa"):
    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation).eval()


@pytest.fixture(params=["sdpa", "eager"])
def model(request, tiny_llava_path):
    return load_model(tiny_llava_path, request.param)


def picture(seed: int, size=(40, 30)) -> Image.Image:
    """A deterministic picture with a few coloured boxes."""
    generator = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in torch.randint(0, 255, (3,), generator=generator)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = (int(v) for v in torch.randint(0, min(size) - 8, (2,), generator=generator))
        colour = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=generator))
        draw.rectangle([x, y, x + 8, y + 8], fill=colour)
    return image


def prompt(processor, text: str, num_images: int) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(processor, texts_and_counts: list[tuple[str, int]], seed: int = 0, sizes: list | None = None) -> dict:
    """Processor inputs for a batch of (question, number of images) prompts, left-padded; with
    ``sizes``, row i's pictures are ``sizes[i]`` (width, height) pixels."""
    texts = [prompt(processor, text, count) for text, count in texts_and_counts]
    images = [
        picture(seed + i, *([sizes[i]] if sizes else []))
        for i, (_, count) in enumerate(texts_and_counts)
        for _ in range(count)
    ]
    if type(processor).__name__.startswith("Gemma3") and images:  # it takes each row's images as a list
        rows, start = [], 0
        for _, count in texts_and_counts:
            rows.append(images[start : start + count])
            start += count
        images = rows
    return dict(processor(images=images or None, text=texts, return_tensors="pt", padding=True))


# The longest tests (the demo, per-task calibration through the CLI) go first, so that the two
# `make test` workers (pytest-xdist) do not end with one of them running alone.
LONGEST_FIRST = ("test_testbed.py", "test_per_task.py", "test_distributed.py", "test_lmms_eval_parity.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each file stays
