"""The testbed LLaVA: a real LlavaForConditionalGeneration (CLIP tower, LLaVA projector, 8-layer
Llama decoder) with a word-level tokenizer, trained from scratch on the testbed tasks' prompts.

Training runs a curriculum (CURRICULUM): captions only first, like LLaVA's alignment stage (the
vision tower and projector learn to say what is where), then every task and the training-only
questions (``training_examples``). In that second stage half of the steps withdraw the visual tokens
before a random layer of the upper half (``VisualTokenWithdrawal``, the engine the backends use),
and those steps also pull the withdrawn answer distribution towards the one with every token
(KL(withdrawn || full), the quantity calibration measures): large LLaVA models move the visual
information into the text tokens by their middle layers (the premise of VTW, measured in the
paper); a decoder this small and this briefly trained does not on its own, so the testbed is taught
it. Which K is safe is still left to calibration to find.

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

from vtw_eval.engine import VisualTokenWithdrawal
from vtw_eval.small_llava import CHAT_TEMPLATE, build_tokenizer, tiny_text_config, tiny_vision_config
from vtw_eval.testbed.tasks import Example, training_examples

IMAGE_SIZE, PATCH_SIZE = 64, 8  # 64 visual tokens per image
NUM_LAYERS = 8
# (steps, tasks) stages that run before every task is mixed in.
CURRICULUM = ((1600, ("coco2017_cap_val",)),)
# Small batches: within the 30-minute budget, twice the updates of batch 16 for 14% fewer examples
# seen; the yes/no questions are the last thing learnt, and need the updates. The learning rate is
# lower by about sqrt(2) to keep the noise of the updates where batch 16 at 1e-3 had it.
BATCH_SIZE, LEARNING_RATE = 8, 7e-4


def build_testbed(examples: list[Example], seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised testbed model whose vocabulary covers every word of ``examples``."""
    torch.manual_seed(seed)
    split = pre_tokenizers.Whitespace()
    words = sorted({w for e in examples for w, _ in split.pre_tokenize_str(f"{e.prompt} {e.answer}")})
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
    # CLIP's default (std 0.02) leaves patches at different places nearly alike after its first
    # layer norm; where a shape is matters to most questions, so positions start distinct.
    torch.nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=0.5)
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


def encode_examples(processor: LlavaProcessor, examples: list[Example]) -> list[dict]:
    """Token ids and labels (answer and end-of-sequence only) as the vtw_llava backend prompts."""
    tokenizer = processor.tokenizer
    encoded = []
    for _, image, prompt, answer in examples:
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


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) positions."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def withdrawn_kl(logits: torch.Tensor, full_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(withdrawn || full) of the next-token distributions at the labelled positions."""
    answer = labels[:, 1:] != -100
    withdrawn = torch.log_softmax(logits[:, :-1][answer], dim=-1)
    full = torch.log_softmax(full_logits[:, :-1][answer], dim=-1)
    return (withdrawn.exp() * (withdrawn - full)).sum(-1).mean()


def curriculum_pools(curriculum, data: list[dict], examples: list[Example]) -> list[tuple[int, list[dict]]]:
    """(last step + 1, encoded examples to draw from) of each curriculum stage."""
    stages = []
    for stage_steps, tasks in curriculum:
        pool = [item for item, example in zip(data, examples) if example.task in tasks]
        stages.append(((stages[-1][0] if stages else 0) + stage_steps, pool))
    return stages


def train(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    examples: list[Example],
    steps: int,
    curriculum: tuple[tuple[int, tuple[str, ...]], ...] = (),
    withdrawal_share: float = 0.5,
    distill_weight: float = 1.0,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """AdamW with warm-up and cosine decay over ``steps``: first the ``curriculum`` stages, each
    drawing only its tasks' examples, then every example, with ``withdrawal_share`` of those steps
    run with withdrawal before a random layer of the upper half of the decoder, their loss adding
    ``distill_weight`` times withdrawn_kl against the same batch without withdrawal (no gradient
    through that one). Returns the loss of every step."""
    torch.manual_seed(seed)
    order = random.Random(seed)
    data = encode_examples(processor, examples)
    stages = curriculum_pools(curriculum, data, examples)
    mixed_from = stages[-1][0] if stages else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    withdrawal = VisualTokenWithdrawal(model, None)
    num_layers = withdrawal.num_layers
    model.train()
    losses = []
    try:
        for step in tqdm(range(steps), desc="training", disable=not progress):
            pool = next((pool for end, pool in stages if step < end), data)
            batch = collate(order.sample(pool, min(batch_size, len(pool))), processor.tokenizer.pad_token_id)
            labels = batch.pop("labels")
            withdraw = step >= mixed_from and order.random() < withdrawal_share
            full_logits = None
            if withdraw and distill_weight:
                withdrawal.withdraw_layer = None
                with torch.no_grad():
                    full_logits = model(**batch, use_cache=False).logits
            withdrawal.withdraw_layer = order.randrange(num_layers // 2, num_layers) if withdraw else None
            logits = model(**batch, use_cache=False).logits
            if withdrawal.plan is not None:  # logits are over the kept positions only
                kept = withdrawal.plan
                labels = labels[kept.batch_rows, kept.kept_positions].masked_fill(~kept.kept_attention_mask, -100)
                if full_logits is not None:
                    full_logits = full_logits[kept.batch_rows, kept.kept_positions]
            loss = answer_loss(logits, labels)
            if full_logits is not None:
                loss = loss + distill_weight * withdrawn_kl(logits, full_logits, labels)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        withdrawal.remove()
    model.eval()
    return losses


def train_and_save(
    out: str | Path, steps: int, examples_per_task: int, seed: int = 0, withdrawal_share: float = 0.5
) -> dict:
    """Build, train and save the testbed with a manifest of how it was made. ``withdrawal_share=0``
    gives the method-blind testbed: the same data, steps and seed, never trained under withdrawal."""
    start = time.time()
    examples = training_examples(examples_per_task, seed)
    model, processor = build_testbed(examples, seed)
    losses = train(
        model, processor, examples, steps, CURRICULUM, withdrawal_share=withdrawal_share, batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE, seed=seed,
    )  # fmt: skip
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    manifest = {
        "seed": seed,
        "steps": steps,
        "curriculum": [[stage_steps, list(tasks)] for stage_steps, tasks in CURRICULUM],
        "withdrawal_share": withdrawal_share,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
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
