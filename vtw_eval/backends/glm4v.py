"""`vtw_glm4v`: GLM-4.1V and GLM-4.6V-Flash checkpoints (`Glm4vForConditionalGeneration`) with VTW.

Prompts and visuals as lmms-eval 0.7.3's ``glm4v`` builds them (``models/simple/glm4v.py``): an
optional system turn, then the user turn with the doc's images before its text (``<image>``
removed), each image sent as a JPEG data URL (quality 85) through the processor's chat
template; answers cut at every ``until`` string, not stripped. Images only, as there.

What the architecture declares to the engine: 3-D rotary positions like Qwen2-VL's, numbered for
decoding from the 2D attention mask; kept tokens keep their positions.
"""

from __future__ import annotations

from transformers import Glm4vForConditionalGeneration

from vtw_eval.architecture import Architecture
from vtw_eval.backends import arguments
from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.chat_prompts import SystemThenImagesThenText


class VTWGlm4v(SystemThenImagesThenText, VTWBackend):
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
