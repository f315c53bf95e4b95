"""lmms-eval's CLI with one more backend, for tests only: ``huggingface_with_test_shims``, lmms-eval
0.7.3's generic chat ``huggingface`` backend with exactly the mends it needs to run a SmolVLM
checkpoint, so that ``vtw_huggingface`` and ``vtw_smolvlm`` can be compared with it
(tests/test_lmms_eval_parity.py). Nothing of lmms-eval is changed; the mends live in a subclass:

1. the model is loaded with ``AutoModelForImageTextToText`` (lmms-eval's test of the model class
   compares a ``model_type`` string with mappings keyed by config classes, so it always loads
   ``AutoModel``, here ``SmolVLMModel``, which has no ``generate``);
2. the processor is not given empty ``audios`` / ``videos`` lists (transformers refuses ``audios``,
   SmolVLM's processor fails on an empty ``videos``).

Its third fault, flattening a batch's images, is not mended: the comparison runs at batch size 1.

    PYTHONPATH=tests python -m lmms_eval_with_shims --model huggingface_with_test_shims --model_args ... (as lmms_eval)
"""

from __future__ import annotations

import torch
from lmms_eval.models.chat.huggingface import Huggingface
from transformers import AutoModelForImageTextToText


class WithoutEmptyMedia:
    """A processor that drops empty ``audios`` / ``videos`` keyword arguments."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, **kwargs):
        return self.processor(
            **{key: value for key, value in kwargs.items() if not (key in ("audios", "videos") and value == [])}
        )

    def __getattr__(self, name):
        return getattr(self.processor, name)


class HuggingfaceWithShims(Huggingface):
    def __init__(self, pretrained: str, **kwargs) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        self._model = AutoModelForImageTextToText.from_pretrained(
            pretrained, dtype=torch.bfloat16, device_map=self.device_map
        ).eval()
        self.processor = WithoutEmptyMedia(self.processor)


if __name__ == "__main__":
    from lmms_eval.__main__ import cli_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest

    MODEL_REGISTRY_V2.register_manifest(
        ModelManifest(
            model_id="huggingface_with_test_shims",
            chat_class_path="lmms_eval_with_shims.HuggingfaceWithShims",
        )
    )
    cli_evaluate()
