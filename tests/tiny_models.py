"""Small random checkpoints of every served family (LLaVA-1.5, -NeXT, -OneVision, Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, Qwen3.5, Gemma 3, GLM-4.1V, InternVL, SmolVLM, Mistral 3, Llama 4, Gemma 4),
built offline from configs and saved with their processors, and the prompts the tests give them.

They load with ``from_pretrained(path)`` exactly like the hub checkpoints, so every code path a
GPU user runs is exercised by the tests (and scripts/gpu_check.py) without a model hub.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
)

from vtw_eval.backends.visuals import per_row
from vtw_eval.engine import VisualTokenWithdrawal
from vtw_eval.registry import BACKENDS
from vtw_eval.small_llava import (
    CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    build_tokenizer,
    tiny_text_config,
    tiny_vision_config,
)

NUM_LAYERS = 4  # of the tiny LLaVA the suite shares (conftest.tiny_llava_path)


def load_model(path, attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation).eval()


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


def build_tiny_llava(
    path: str | Path,
    num_layers: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    any_resolution: bool = False,
    sliding_window: tuple[str, int] | None = None,
    text_width: int = 64,
) -> Path:
    """A LlavaForConditionalGeneration (LLaVA-1.5) with random weights, saved with its processor;
    with ``any_resolution`` a LlavaNextForConditionalGeneration (tiles and image-newline tokens).
    ``sliding_window`` gives it a decoder with a sliding window of that many tokens: ("mistral", w)
    on every layer, ("qwen2", w) on the layers from 2 on (Qwen2's max_window_layers). ``text_width``:
    the text model's width (4 heads, 2 key/value heads; 128 gives vLLM's head size 32)."""
    from transformers import MistralConfig, Qwen2Config

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_config = tiny_text_config(len(tokenizer), num_layers)
    if text_width != text_config.hidden_size:
        text_config.hidden_size, text_config.intermediate_size = text_width, 2 * text_width
        text_config.head_dim = text_width // text_config.num_attention_heads
    if sliding_window is not None:
        family, window = sliding_window
        fields = {k: v for k, v in text_config.to_dict().items() if k not in ("model_type", "layer_types")}
        if family == "mistral":
            text_config = MistralConfig(**fields, sliding_window=window)
        else:
            text_config = Qwen2Config(**fields, use_sliding_window=True, sliding_window=window, max_window_layers=2)
    common = dict(
        vision_config=tiny_vision_config(),
        text_config=text_config,
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


def qwen_tokenizer():
    """The tiny tokenizer with the Qwen chat template, and the config's visual token ids."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    return tokenizer, dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_qwen2_vl(
    path: str | Path, version: str = "2", num_layers: int = 4, seed: int = 0, text_width: int = 64
) -> Path:
    """A Qwen2VLForConditionalGeneration (``version="2"``) or Qwen2_5_VL one ("2.5"): multimodal
    rotary positions (3-row position ids), image and video pad tokens. ``text_width``: the text
    model's width (4 heads; 128 gives vLLM's head size 32, with the rotary sections doubled)."""
    import transformers

    torch.manual_seed(seed)
    tokenizer, token_ids = qwen_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        # the sections split half a head's dimensions: 8 of 16, or 16 of 32
        rope_parameters={
            "rope_type": "default",
            "mrope_section": [section * text_width // 64 for section in (2, 3, 3)],
            "rope_theta": 10000.0,
        },
    )
    if version == "2":
        vision = dict(depth=1, embed_dim=32, hidden_size=text_width, num_heads=2, mlp_ratio=2)
        names = ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor")
    elif version == "2.5":
        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text_width,
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
        **token_ids,
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


# Qwen3-VL / Qwen3.5's chat format: system content as text parts (lmms-eval's chat backend sends
# them so), and Qwen3.5's thinking switch after the assistant header.
QWEN3_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking %}"
    "<think>\n{% elif enable_thinking is defined %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
)
QWEN3_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def build_tiny_qwen3(
    path: str | Path, family: str = "qwen3_vl", num_layers: int = 4, seed: int = 0, text_width: int = 64
) -> Path:
    """A Qwen3-VL or Qwen3.5 checkpoint, dense or MoE (``family`` is its model_type): 16 px patches
    merged 2x2 (32 px per visual token), interleaved multimodal rotary positions, and

    * Qwen3-VL: DeepStack, the features of ViT blocks 0, 1, 2 added at the visual positions after
      decoder layers 0, 1, 2;
    * Qwen3.5: Gated DeltaNet (linear attention) layers 0-2, full attention at layer 3 (one in
      four), and the thinking switch in the chat template.

    ``text_width``: the text model's width (4 heads; 128 gives vLLM's head size 32, Qwen3-VL only)."""
    import transformers

    if family not in QWEN3_FAMILIES:
        raise ValueError(f"family={family!r}: use one of {QWEN3_FAMILIES}")
    torch.manual_seed(seed)
    tokenizer, token_ids = qwen_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])  # ordinary text to the tokenizer, as in Qwen3.5's
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    text = dict(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=text_width // 4,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
        rope_parameters={
            "rope_type": "default", "mrope_section": [section * text_width // 64 for section in (2, 3, 3)],
            "mrope_interleaved": True, "rope_theta": 1e4,
        },
    )  # fmt: skip
    vision = dict(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_width, patch_size=16,
        num_position_embeddings=16,
    )  # fmt: skip
    if family.startswith("qwen3_5"):  # a quarter of the head is rotary: 4 of 16 dims, 2 frequencies
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [1, 1, 0], "partial_rotary_factor": 0.25}
        # Wider weights and slowly decaying recurrent states: at the default initialisation a tiny
        # random Qwen3.5 gives every prompt the same answer in bfloat16.
        text.update(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                    linear_num_key_heads=2, linear_num_value_heads=4, initializer_range=0.2)  # fmt: skip
        vision["initializer_range"] = 1.0
    else:
        vision["deepstack_visual_indexes"] = [0, 1, 2]
    if family.endswith("moe"):
        text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        if family == "qwen3_5_moe":
            text.update(shared_expert_intermediate_size=32)
    names = {
        "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
        "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration"),
        "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration"),
        "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration"),
    }[family]
    config_class, model_class = (getattr(transformers, name) for name in names)
    config = config_class(text_config=text, vision_config=vision, **token_ids)
    model = model_class(config).eval()
    for name, parameter in model.named_parameters():
        if name.endswith("linear_attn.A_log"):
            parameter.data.fill_(-6.0)  # decay rate A = exp(-6) per token: the state remembers the prompt
    pixels = dict(patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=128 * 128)
    processor = transformers.Qwen3VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**pixels),
        video_processor=transformers.Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
        tokenizer=tokenizer,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    return _save(path, model, processor)


# Gemma 3's chat format: the system text opens the first user turn; an image part is the image
# start token, which the processor expands into the image's soft tokens.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set system = namespace(text='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set system.text = message['content'] if message['content'] is string else message['content'][0]['text'] %}"
    "{% else %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if system.text %}{{ system.text }}\n\n{% set system.text = '' %}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny_gemma3(path: str | Path, num_layers: int = 4, seed: int = 0, sliding_window: int = 8) -> Path:
    """A Gemma3ForConditionalGeneration: a SigLIP tower whose 4x4 patches are pooled into 4 soft
    tokens per image, attended bidirectionally within the image in prefill (token_type_ids);
    sliding-window layers (window 8) with a full-attention layer every sixth (here layer 3 of 4,
    so both kinds are withdrawn), and two rotary embeddings, local and global."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(["user", "model"])
    special = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer.add_tokens(["<start_of_turn>", "<end_of_turn>", *special.values()], special_tokens=True)
    tokenizer._set_model_specific_special_tokens(special_tokens=special)  # boi_token, ..., saved with it
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # saved, as in Gemma 3's releases
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in special.items()}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=sliding_window, layer_types=["sliding_attention"] * 3 + ["full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8,
    )  # fmt: skip
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"],
    )  # fmt: skip
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # a random tower at the default scale gives every image the same answer
        for name, parameter in model.named_parameters():
            if ("vision_tower" in name or "multi_modal_projector" in name) and parameter.dim() > 1:
                parameter.normal_(0, 0.5)
    processor = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=4,
    )
    return _save(path, model, processor)


# GLM-4.1V's chat format: the role tags, an image part as its start, pad and end tokens.
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_glm4v(path: str | Path, num_layers: int = 4, seed: int = 0) -> Path:
    """A Glm4vForConditionalGeneration (GLM-4.1V): 14 px patches merged 2x2, 3-D rotary
    positions on half of each head, image start/end markers around the image pads."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    markers = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|image|>",
               "<|end_of_image|>", "<|begin_of_video|>", "<|video|>", "<|end_of_video|>"]  # fmt: skip
    tokenizer.add_tokens(markers, special_tokens=True)
    tokenizer.chat_template = GLM4V_CHAT_TEMPLATE
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=3, eos_token_id=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5,
                         "rope_theta": 1e4},
    )  # fmt: skip
    vision = dict(
        depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, image_size=28, patch_size=14,
    )  # fmt: skip
    config = transformers.Glm4vConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"), image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"), video_end_token_id=ids("<|end_of_video|>"),
    )  # fmt: skip
    model = transformers.Glm4vForConditionalGeneration(config).eval()
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    processor = transformers.Glm4vProcessor(
        image_processor=transformers.Glm4vImageProcessor(size=size),
        video_processor=transformers.Glm4vVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=GLM4V_CHAT_TEMPLATE,
    )
    return _save(path, model, processor)


# InternVL's chat format (Qwen-style turns): an image part is its context token, which the
# processor expands into the start token, the context tokens of every tile and the end token.
INTERNVL_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n"
).replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>\n")


def build_tiny_internvl(path: str | Path, num_layers: int = 4, seed: int = 0) -> Path:
    """An InternVLForConditionalGeneration (InternVL3 "-hf" layout): an InternViT over 32 px tiles
    of 8 px patches, pixel-shuffled (downsample 0.5) into 4 tokens a tile, a Qwen2 decoder; images
    tiled into 1 to 4 tiles plus a thumbnail."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    special = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
               "video_token": "<video>"}  # fmt: skip
    tokenizer.add_tokens([t for t in special.values() if t not in tokenizer.get_vocab()], special_tokens=True)
    tokenizer._set_model_specific_special_tokens(special_tokens=special)
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    text = transformers.Qwen2Config(**{**tiny_text_config(len(tokenizer), num_layers).to_dict(), "model_type": "qwen2"})
    vision = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=[32, 32],
        patch_size=[8, 8],
    )  # fmt: skip
    config = transformers.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
    )  # fmt: skip
    model = transformers.InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # at the default scale every image gets the same answer in bfloat16
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.5 if "vision_tower" in name or "multi_modal_projector" in name else 0.1)
    processor = transformers.InternVLProcessor(
        image_processor=transformers.GotOcr2ImageProcessor(
            size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4
        ),
        video_processor=transformers.InternVLVideoProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return _save(path, model, processor)


# SmolVLM's chat format: "User:" / "Assistant:" turns, an image part as its placeholder, which the
# processor expands into each tile's row/column marker and image tokens, then the global image's.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tiny_smolvlm(path: str | Path, num_layers: int = 4, seed: int = 0) -> Path:
    """A SmolVLMForConditionalGeneration: a SigLIP-like tower over 32 px tiles of 8 px patches,
    pixel-shuffled (scale 2) into 4 tokens a tile; images resized to 64 px at most and split into
    up to 2 x 2 tiles with ``<row_r_col_c>`` markers, plus a global image; a Llama decoder."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(["User", "Assistant"])
    markers = [f"<row_{row}_col_{col}>" for row in (1, 2) for col in (1, 2)]
    tokenizer.add_tokens(
        ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", *markers],
        special_tokens=True,
    )
    tokenizer.chat_template = SMOLVLM_CHAT_TEMPLATE
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )  # fmt: skip
    config = transformers.SmolVLMConfig(
        text_config=tiny_text_config(len(tokenizer), num_layers).to_dict(), vision_config=vision, scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=3,
    )  # fmt: skip
    model = transformers.SmolVLMForConditionalGeneration(config).eval()
    with torch.no_grad():  # at the default scale every image gets much the same answer in bfloat16
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.5 if "vision_model" in name or "connector" in name else 0.1)
    processor = transformers.SmolVLMProcessor(
        image_processor=transformers.SmolVLMImageProcessor(
            size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
        ),
        video_processor=transformers.SmolVLMVideoProcessor(),
        tokenizer=tokenizer,
        image_seq_len=4,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    return _save(path, model, processor)


# Mistral's instruction format (what Mistral 3's template gives a text-only turn); lmms-eval's
# mistral3_vl writes image prompts itself.
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}[IMG]{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}[/INST]{% elif message['role'] == 'system' %}"
    "[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]{% else %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def build_tiny_mistral3(path: str | Path, num_layers: int = 4, seed: int = 0) -> Path:
    """A Mistral3ForConditionalGeneration as Ministral 3 is: a Pixtral tower over 8 px patches merged
    2 x 2 (one token per 16 px, each row of an image ended by ``[IMG_BREAK]``, the last by
    ``[IMG_END]``), and a Ministral 3 decoder whose queries are scaled by their position (Llama 4's
    scaling, beta 0.1, from position 16 on here, so most of a prompt's tokens are scaled)."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    markers = ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tokenizer.add_tokens(markers, special_tokens=True)
    tokenizer.chat_template = MISTRAL3_CHAT_TEMPLATE
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    rope = {
        "type": "yarn", "rope_theta": 1e6, "factor": 32.0, "original_max_position_embeddings": 16,
        "max_position_embeddings": 512, "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
        "llama_4_scaling_beta": 0.1,
    }  # fmt: skip
    text = transformers.Ministral3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_parameters=rope,
        pad_token_id=3, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16, image_size=64,
        patch_size=8,
    )  # fmt: skip
    config = transformers.Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # at the default scale every image gets much the same answer
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.5 if "vision_tower" in name or "multi_modal_projector" in name else 0.1)
    processor = transformers.PixtralProcessor(
        image_processor=transformers.PixtralImageProcessor(
            size={"longest_edge": 64}, patch_size={"height": 8, "width": 8}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        spatial_merge_size=2,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )
    return _save(path, model, processor)


# Llama 4's chat format: header-delimited turns; an image part is the placeholder the processor
# expands into each tile's patch tokens with tile separators, then the global image's.
LLAMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|header_start|>{{ message['role'] }}<|header_end|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


def build_tiny_llama4(path: str | Path, num_layers: int = 4, seed: int = 0) -> Path:
    """A Llama4ForConditionalGeneration: a tower over 32 px tiles of 8 px patches, pixel-shuffled
    into 4 ``<|patch|>`` tokens a tile, images split into up to 2 x 2 tiles plus a global image; a
    decoder whose layers 0-2 use rotary positions within chunks of 8 tokens and layer 3 none, its
    queries scaled by position instead (temperature tuning, floor_scale 8, so the scale changes
    every 8 tokens of a prompt); layers 1 and 3 a mixture of 4 experts with a shared one."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    markers = ["<|header_start|>", "<|header_end|>", "<|eot|>", "<|image_start|>", "<|image_end|>", "<|image|>",
               "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]  # fmt: skip
    tokenizer.add_tokens(markers, special_tokens=True)
    tokenizer.chat_template = LLAMA4_CHAT_TEMPLATE
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    ids = tokenizer.convert_tokens_to_ids
    text = transformers.Llama4TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32, intermediate_size_mlp=128,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        attention_chunk_size=8, floor_scale=8, attn_scale=0.1, pad_token_id=3, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )  # fmt: skip
    vision = transformers.Llama4VisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, vision_output_dim=64,
        image_size=32, patch_size=8, pixel_shuffle_ratio=0.5, projector_input_dim=64, projector_output_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    config = transformers.Llama4Config(
        text_config=text, vision_config=vision, image_token_index=ids("<|patch|>"),
        boi_token_index=ids("<|image_start|>"), eoi_token_index=ids("<|image_end|>"), tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():  # at the default scale every image gets much the same answer in bfloat16
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.5 if "vision_model" in name or "multi_modal_projector" in name else 0.1)
    processor = transformers.Llama4Processor(
        image_processor=transformers.Llama4ImageProcessor(size={"height": 32, "width": 32}, max_patches=4),
        tokenizer=tokenizer,
        patch_size=8,
        pixel_shuffle_ratio=0.5,
        chat_template=LLAMA4_CHAT_TEMPLATE,
    )
    return _save(path, model, processor)


# Gemma 4's chat format: turns between <|turn> and <turn|>; an image part is the placeholder the
# processor expands into its begin, soft and end tokens.
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def build_tiny_gemma4(path: str | Path, num_layers: int = 4, seed: int = 0, moe: bool = False) -> Path:
    """A Gemma4ForConditionalGeneration: a tower over 8 px patches pooled 2 x 2 (at most 70 soft
    tokens an image, its smallest budget), sliding (window 24: the last prompt token sees part of an
    image) and full layers alternating, the full
    ones with wider heads and partly rotated. Dense (E2B/E4B-like): a per-layer input of 8 per
    layer, and layers 2 and 3 reading the keys of layers 0 and 1 (KV sharing). ``moe`` (26B-A4B-like):
    no per-layer inputs or sharing, an MLP plus 4 experts (2 a token) in every layer, full layers'
    values equal to their keys, and image tokens attending to each other in prefill."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(["user", "model", "system"])
    special = {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
               "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"}  # fmt: skip
    tokenizer.add_tokens(["<|turn>", "<turn|>", *special.values(), "<|video|>"], special_tokens=True)
    tokenizer._set_model_specific_special_tokens(special_tokens=special)  # boi_token, ..., saved with it
    tokenizer.chat_template = GEMMA4_CHAT_TEMPLATE
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    special_ids = {**special, "video_token": "<|video|>"}
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in special_ids.items()}
    text = dict(
        vocab_size=len(tokenizer), vocab_size_per_layer_input=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        sliding_window=24, layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
        hidden_size_per_layer_input=8, num_kv_shared_layers=num_layers // 2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    if moe:
        text.update(
            hidden_size_per_layer_input=0, num_kv_shared_layers=0, enable_moe_block=True, num_experts=4,
            top_k_experts=2, moe_intermediate_size=32, attention_k_eq_v=True, num_global_key_value_heads=1,
            use_bidirectional_attention="vision",
        )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, patch_size=8, pooling_kernel_size=2, position_embedding_size=64,
    )  # fmt: skip
    config = transformers.Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, image_token_id=ids["image_token"],
        boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"], video_token_id=ids["video_token"],
        audio_token_id=ids["audio_token"], boa_token_id=ids["boa_token"], eoa_token_index=ids["eoa_token"],
    )  # fmt: skip
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():  # a random tower at the default scale gives every image the same answer
        for name, parameter in model.named_parameters():
            if "vision" in name and parameter.dim() > 1:
                parameter.normal_(0, 0.5)
    images = dict(patch_size=8, pooling_kernel_size=2, max_soft_tokens=70)
    processor = transformers.Gemma4Processor(
        feature_extractor=transformers.Gemma4AudioFeatureExtractor(),
        image_processor=transformers.Gemma4ImageProcessor(**images),
        tokenizer=tokenizer,
        video_processor=transformers.Gemma4VideoProcessor(**images),
        chat_template=GEMMA4_CHAT_TEMPLATE,
        image_seq_length=70,
    )
    return _save(path, model, processor)


BUILDERS = {
    # Sliding windows of 8 tokens, shorter than the prompts: every layer, or layers 2 and 3.
    "llava_mistral_window": lambda path: build_tiny_llava(path, sliding_window=("mistral", 8)),
    "llava_qwen2_window": lambda path: build_tiny_llava(path, sliding_window=("qwen2", 8)),
    "llava_onevision": build_tiny_llava_onevision,
    # Gemma 3: bidirectional image attention in prefill, sliding layers 0-2 (window 8), two rotary embeddings.
    "gemma3": build_tiny_gemma3,
    "glm4v": build_tiny_glm4v,  # 3-D rotary positions on half of each head
    "internvl": build_tiny_internvl,  # tiles of 4 tokens each, plus a thumbnail
    "smolvlm": build_tiny_smolvlm,  # up to 2 x 2 tiles of 4 tokens with row/column markers, plus a global image
    "mistral3": build_tiny_mistral3,  # image rows ended by break tokens; queries scaled by position
    # Llama 4: chunked RoPE layers 0-2 (chunks of 8), NoPE layer 3 with position-scaled queries, experts in 1 and 3.
    "llama4": build_tiny_llama4,
    # Gemma 4: per-layer inputs, layers 2-3 reading the keys of 0-1 (its MoE variant: MOE_BUILDERS).
    "gemma4": build_tiny_gemma4,
    "qwen2_vl": lambda path: build_tiny_qwen2_vl(path, "2"),
    "qwen2_5_vl": lambda path: build_tiny_qwen2_vl(path, "2.5"),
    # Qwen3-VL: DeepStack after decoder layers 0, 1, 2; Qwen3.5: Gated DeltaNet layers 0-2.
    **{family: lambda path, family=family: build_tiny_qwen3(path, family) for family in QWEN3_FAMILIES},
}

# Variants whose withdrawal paths the families above already run, tested where they differ (every K
# against the reference, cached generation, FLOPs, the CLI): Gemma 4's 26B-A4B-like MoE (experts
# beside the MLP, values equal to keys, image tokens attending to each other).
MOE_BUILDERS = {"gemma4_moe": lambda path: build_tiny_gemma4(path, moe=True)}


def adapter_for(model_or_config) -> type:
    """The vtw_eval backend class that serves the family of a model (or of its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    for path in BACKENDS.values():
        module, name = path.rsplit(".", 1)
        adapter = getattr(importlib.import_module(module), name)
        if config.model_type in adapter.model_classes:
            return adapter
    raise ValueError(f"no vtw_eval backend serves {config.model_type!r}")


def withdrawal(model, withdraw_layer: int | None, keep_selector=None) -> VisualTokenWithdrawal:
    """The engine as the family's backend sets it up: from the architecture its adapter declares."""
    return VisualTokenWithdrawal(model, withdraw_layer, adapter_for(model).architecture, keep_selector)


def with_tokens(inputs: dict, sequence: torch.Tensor) -> dict:
    """The prompt's multimodal inputs for ``sequence`` (prompt plus generated text tokens), to
    recompute a generation from scratch."""
    extra = sequence.shape[1] - inputs["input_ids"].shape[1]
    grown = {**inputs, "input_ids": sequence, "attention_mask": torch.ones_like(sequence)}
    if "mm_token_type_ids" in inputs:  # generated tokens are text (type 0)
        grown["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, extra))
    return grown


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
    if type(processor).__name__.startswith(("Gemma3", "Gemma4", "SmolVLM")) and images:  # each row's images as a list
        images = per_row(images, [count for _, count in texts_and_counts])
    inputs = processor(images=images or None, text=texts, return_tensors="pt", padding=True)
    # Llama 4's image processor gives bfloat16 pixels; the tiny models are float32.
    return {key: value.float() if value.is_floating_point() else value for key, value in inputs.items()}
