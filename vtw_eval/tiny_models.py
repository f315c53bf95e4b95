"""Small random checkpoints in the llava-hf layout, built offline from configs.

They load with ``from_pretrained(path)`` exactly like ``llava-hf/llava-1.5-7b-hf`` (model,
word-level tokenizer with an ``<image>`` token, CLIP image processor, LlavaProcessor with a
llava-1.5 chat template), so every code path a GPU user runs is exercised by the tests and the
demo without a model hub.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
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


# Qwen2-VL's chat format (one image or video part becomes vision_start, pads, vision_end).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
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


def build_tiny_llava(
    path: str | Path,
    num_layers: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    any_resolution: bool = False,
) -> Path:
    """A LlavaForConditionalGeneration (LLaVA-1.5) with random weights, saved with its processor;
    with ``any_resolution`` a LlavaNextForConditionalGeneration (tiles and image-newline tokens)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    common = dict(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(len(tokenizer), num_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    sizes = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    if any_resolution:
        grid = [[32, 32], [32, 64], [64, 32]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=grid)
        model_class, processor_class = LlavaNextForConditionalGeneration, LlavaNextProcessor
        image_processor = LlavaNextImageProcessor(**sizes, image_grid_pinpoints=grid)
    else:
        config = LlavaConfig(**common)
        model_class, processor_class = LlavaForConditionalGeneration, LlavaProcessor
        image_processor = CLIPImageProcessor(**sizes, do_center_crop=True)
    config._attn_implementation = attn_implementation
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    return _save(path, model_class(config).eval(), processor)


def _save(path: str | Path, model, processor) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


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


def build_tiny_llava_onevision(path: str | Path, num_layers: int = 4, seed: int = 0) -> Path:
    """A LlavaOnevisionForConditionalGeneration: SigLIP tower, Qwen2 decoder, any-resolution tiles."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    grid = [[32, 32], [32, 64], [64, 32]]
    text = Qwen2Config(**{**tiny_text_config(len(tokenizer), num_layers).to_dict(), "model_type": "qwen2"})
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=grid,
        vision_feature_layer=-1,
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    size = {"height": 32, "width": 32}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=grid),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )
    return _save(path, model, processor)


def build_tiny_qwen2_vl(path: str | Path, version: str = "2", num_layers: int = 4, seed: int = 0) -> Path:
    """A Qwen2VLForConditionalGeneration (``version="2"``) or Qwen2_5_VL one ("2.5"): multimodal
    rotary positions (3-row position ids), image and video pad tokens."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    )
    if version == "2":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        names = ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor")
    elif version == "2.5":
        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[0],
            window_size=56,
        )
        names = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")
    else:
        raise ValueError(f"version={version!r}: use '2' or '2.5'")
    config_class, model_class, processor_class = (getattr(transformers, name) for name in names)
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = model_class(config).eval()
    pixels = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = processor_class(
        image_processor=transformers.Qwen2VLImageProcessor(**pixels),
        video_processor=transformers.Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return _save(path, model, processor)
