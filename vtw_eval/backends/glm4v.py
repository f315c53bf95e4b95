"""`vtw_glm4v`: GLM-4.1V and GLM-4.6V-Flash checkpoints (`Glm4vForConditionalGeneration`) with VTW.

Prompts and visuals as lmms-eval 0.7.3's ``glm4v`` builds them (``models/simple/glm4v.py``): an
optional system turn, then the user turn with the doc's images before its text (``<image>``
removed), each image sent as a JPEG data URL (quality 85) through the processor's chat
template; answers cut at every ``until`` string, not stripped. Images only, as there.

What the architecture declares to the engine: 3-D rotary positions like Qwen2-VL's, numbered for
decoding from the 2D attention mask; kept tokens keep their positions.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import Glm4vForConditionalGeneration

from vtw_eval.architecture import Architecture
from vtw_eval.backends import arguments
from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.visuals import Visual, jpeg_data_url


class VTWGlm4v(VTWBackend):
    # The MoE GLM-4.6V (Glm4vMoeForConditionalGeneration) is not served: its experts are not in the cost model.
    model_classes = {"glm4v": Glm4vForConditionalGeneration}
    architecture = Architecture(decoding_positions="from_attention_mask")  # 3-D rotary positions follow the 2D mask
    decode_kwargs = {"clean_up_tokenization_spaces": False}
    strips_answers = False

    def __init__(self, pretrained: str, max_new_tokens: int = 8192, system_prompt: str | None = None, **kwargs) -> None:
        # lmms-eval's glm4v: generation defaults under the task's generation_kwargs, its answer
        # length a model argument.
        self.default_generation_kwargs = {
            "max_new_tokens": arguments.integer("max_new_tokens", max_new_tokens),
            "temperature": 0.0,
            "top_p": None,
            "num_beams": 1,
        }
        self.system_prompt = system_prompt
        super().__init__(pretrained, **kwargs)

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        content = [*[{"type": "image"}] * len(visuals), {"type": "text", "text": context.replace("<image>", "")}]
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: list[str], visuals: list[list[Visual]]) -> dict[str, torch.Tensor]:
        """Images as lmms-eval sends them (JPEG data URLs, which the processor decodes)."""
        images = [jpeg_data_url(v) for row in visuals for v in row if isinstance(v, Image.Image)]
        inputs = self.processor(
            text=prompts,
            images=images or None,
            padding=True,
            add_special_tokens=self.adds_special_tokens(prompts),
            return_tensors="pt",
        )
        inputs.pop("token_type_ids", None)  # lmms-eval's glm4v drops them too
        return self._on_device(inputs)
