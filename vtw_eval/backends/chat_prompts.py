"""The prompt and processor call that lmms-eval 0.7.3's ``glm4v`` and ``llama4_scout`` share: an
optional system turn (its text as the content), then the user turn with the doc's images before
its text (``<image>`` removed), through the processor's chat template; each image sent as a JPEG
data URL (quality 85), which the processor decodes itself."""

from __future__ import annotations

import torch
from PIL import Image

from vtw_eval.backends.visuals import Visual, jpeg_data_url


class SystemThenImagesThenText:
    """``build_prompt`` and ``encode`` for a ``VTWBackend`` with a ``system_prompt`` attribute."""

    system_prompt: str | None

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        content = [*[{"type": "image"}] * len(visuals), {"type": "text", "text": context.replace("<image>", "")}]
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: list[str], visuals: list[list[Visual]]) -> dict[str, torch.Tensor]:
        """Images as lmms-eval sends them (JPEG data URLs, which the processor decodes); floating
        inputs in the model's dtype (Llama 4's image processor gives bfloat16 pixels)."""
        images = [jpeg_data_url(v) for row in visuals for v in row if isinstance(v, Image.Image)]
        inputs = self.processor(
            text=prompts,
            images=images or None,
            padding=True,
            add_special_tokens=self.adds_special_tokens(prompts),
            return_tensors="pt",
        )
        inputs.pop("token_type_ids", None)  # lmms-eval's glm4v drops them (Llama 4's processor gives none)
        return self._on_device(inputs)
