"""LLaVA models and a word-level tokenizer built from configs, offline.

What the testbed is made of (``vtw_eval/testbed/train.py``: its tokenizer, its CLIP and Llama
configs, the LLaVA-1.5 chat template) and the benchmarks' randomly initialised LLaVA with
LLaVA-1.5's layer and visual-token counts (``scripts/bench_*.py``). The tests build their small
checkpoints from these too (``tests/tiny_models.py``).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = (
    "A chat between a curious user and an artificial intelligence assistant . The assistant gives "
    "helpful , detailed , and polite answers to the user's questions USER ASSISTANT : ? ! \n "
    "Is there the in image picture Answer question using single word or phrase yes no Yes No "
    "What colour color shape how many of is are on left right top bottom center red green blue "
    "yellow white black circle square triangle text say does Please answer with letter option "
    "from given choices directly Describe this briefly one two three four five six seven eight "
    "nine ten it . , big small"
).split(" ")
# Llama-1.5's chat template, accepting string content and lists of image/text parts.
# Llama-1.5's chat template, accepting string content and lists of image/text parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(extra_words: list[str] = ()) -> PreTrainedTokenizerFast:
    words = list(dict.fromkeys([*WORDS, *extra_words, *string.ascii_letters, *string.digits, *string.punctuation]))
    words = [w for w in words if w and w not in SPECIAL_TOKENS]
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>", *QWEN_SPECIAL_TOKENS]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_config(vocab_size: int, num_layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query heads, so the KV layout is not the trivial one
        max_position_embeddings=512,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_vision_config(
    image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, num_layers: int = 2
) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def random_llava(
    num_layers: int = 32,
    hidden_size: int = 1024,
    intermediate_size: int = 2752,
    num_heads: int = 8,
    image_size: int = 336,
    patch_size: int = 14,
    vocab_size: int = 1000,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA with a real layer count and visual token count, for benchmarks.

    The defaults keep LLaVA-1.5's 32 layers and 576 visual tokens (336 px, 14 px patches) with the
    width scaled to fit a CPU; the vision tower is one thin layer, since VTW does not change it.
    """
    torch.manual_seed(seed)
    vision = tiny_vision_config(image_size, patch_size, hidden_size=64, num_layers=1)
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab_size - 1, vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config).eval()


def llava_prompt(
    model: LlavaForConditionalGeneration, text_before: int, text_after: int, batch_size: int = 1, seed: int = 0
) -> dict:
    """Model inputs of a one-image prompt: ``text_before`` tokens, the image, ``text_after`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    num_visual = (vision.image_size // vision.patch_size) ** 2
    vocab = model.config.text_config.vocab_size - 1  # the last id is the image token
    text = torch.randint(0, vocab, (batch_size, text_before + text_after), generator=generator)
    image = torch.full((batch_size, num_visual), model.config.image_token_id)
    input_ids = torch.cat([text[:, :text_before], image, text[:, text_before:]], dim=1)
    pixel_values = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}


def save_tower_in_hub_layout(folder: Path) -> None:
    """Rename a saved LLaVA's vision tower weights to the hub's layout (``vision_tower.vision_model.*``,
    what released checkpoints have and vLLM 0.32 loads) from transformers 5's
    (``vision_tower.embeddings.*``, which vLLM 0.32 refuses); transformers loads both."""
    from safetensors.torch import load_file, save_file

    weights_file = Path(folder) / "model.safetensors"
    renamed = {}
    for name, tensor in load_file(weights_file).items():
        if ".vision_tower." in f".{name}" and ".vision_model." not in name:
            head, tail = name.split("vision_tower.", 1)
            name = f"{head}vision_tower.vision_model.{tail}"
        renamed[name] = tensor
    save_file(renamed, weights_file, metadata={"format": "pt"})
