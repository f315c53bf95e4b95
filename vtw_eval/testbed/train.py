"""The testbed LLaVA: a real LlavaForConditionalGeneration (CLIP tower, LLaVA projector, 8-layer
Llama decoder) with a word-level tokenizer, trained from scratch on the testbed tasks' prompts.

``scripts/train_testbed.py`` runs it; the trained weights are committed under testbed/model.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from tqdm import tqdm
from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from vtw_eval.testbed.tasks import training_examples
from vtw_eval.tiny_models import CHAT_TEMPLATE, build_tokenizer, tiny_text_config, tiny_vision_config

IMAGE_SIZE, PATCH_SIZE = 64, 8  # 64 visual tokens per image
NUM_LAYERS = 8


def build_testbed(examples: list[tuple], seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised testbed model whose vocabulary covers every word of ``examples``."""
    torch.manual_seed(seed)
    split = pre_tokenizers.Whitespace()
    words = sorted({w for _, prompt, answer in examples for w, _ in split.pre_tokenize_str(f"{prompt} {answer}")})
    tokenizer = build_tokenizer(extra_words=words)
    text = tiny_text_config(len(tokenizer), NUM_LAYERS)
    text.hidden_size, text.intermediate_size, text.num_key_value_heads = 128, 352, 4
    vision = tiny_vision_config(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    vision.hidden_size, vision.intermediate_size, vision.num_attention_heads = 96, 192, 4
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    sizes = dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(**sizes, do_center_crop=True),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def encode_examples(processor: LlavaProcessor, examples: list[tuple]) -> list[dict]:
    """Token ids and labels (answer and end-of-sequence only) as the vtw_llava backend prompts."""
    tokenizer = processor.tokenizer
    encoded = []
    for image, prompt, answer in examples:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>\n" + prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_inputs = processor(images=[image], text=[text], return_tensors="pt")
        answer_ids = tokenizer(f" {answer}", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        answer_ids = torch.cat([answer_ids, torch.tensor([tokenizer.eos_token_id])])
        input_ids = torch.cat([prompt_inputs["input_ids"][0], answer_ids])
        labels = torch.cat([torch.full_like(prompt_inputs["input_ids"][0], -100), answer_ids])
        encoded.append({"input_ids": input_ids, "labels": labels, "pixel_values": prompt_inputs["pixel_values"][0]})
    return encoded


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(item["input_ids"]) for item in batch)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(i[key], (0, length - len(i[key])), value=value) for i in batch])

    input_ids = pad("input_ids", pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": (pad("labels", -7) != -7).long(),
        "labels": pad("labels", -100),
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
    }


def train(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    examples: list[tuple],
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """AdamW with warm-up and cosine decay; returns the loss of every step."""
    torch.manual_seed(seed)
    order = random.Random(seed)
    data = encode_examples(processor, examples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="training", disable=not progress):
        batch = collate(order.sample(data, min(batch_size, len(data))), processor.tokenizer.pad_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def train_and_save(out: str | Path, steps: int, examples_per_task: int, seed: int = 0) -> dict:
    """Build, train and save the testbed with a manifest of how it was made."""
    start = time.time()
    examples = training_examples(examples_per_task, seed)
    model, processor = build_testbed(examples, seed)
    losses = train(model, processor, examples, steps, seed=seed)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    manifest = {
        "seed": seed,
        "steps": steps,
        "examples_per_task": examples_per_task,
        "training_examples": len(examples),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "first_loss": losses[0],
        "minutes": round((time.time() - start) / 60, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "script_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
        "torch": torch.__version__,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
