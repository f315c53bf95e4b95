"""lmms-eval model registration (entry-point group ``lmms_eval.models``).

lmms-eval loads this while ``lmms_eval.models`` is still initialising, so it imports nothing at
module level: importing ``lmms_eval.models`` here, or torch, would break plugin loading, and so
would importing this module first in a fresh process (lmms-eval would find it half-initialised).
"""

BACKENDS = {
    "vtw_llava": "vtw_eval.backends.llava.VTWLlava",
    "vtw_llava_onevision": "vtw_eval.backends.llava.VTWLlavaOnevision",
    "vtw_qwen2_vl": "vtw_eval.backends.qwen2_vl.VTWQwen2VL",
    "vtw_qwen2_5_vl": "vtw_eval.backends.qwen2_vl.VTWQwen2_5VL",
    "vtw_qwen3_vl": "vtw_eval.backends.qwen3_vl.VTWQwen3VL",
    "vtw_qwen3_5": "vtw_eval.backends.qwen3_5.VTWQwen3_5",
    "vtw_gemma3": "vtw_eval.backends.gemma3.VTWGemma3",
    "vtw_gemma4": "vtw_eval.backends.gemma4.VTWGemma4",
    "vtw_glm4v": "vtw_eval.backends.glm4v.VTWGlm4v",
    "vtw_internvl": "vtw_eval.backends.internvl.VTWInternVL",
    "vtw_llama4": "vtw_eval.backends.llama4.VTWLlama4",
    "vtw_mistral3": "vtw_eval.backends.mistral3.VTWMistral3",
    "vtw_smolvlm": "vtw_eval.backends.huggingface.VTWSmolVLM",
    # any model type the backends above serve, with lmms-eval's generic huggingface prompts
    "vtw_huggingface": "vtw_eval.backends.huggingface.VTWHuggingface",
}
# Backends with a chat class only (lmms-eval's own vllm backend is one); vtw_vllm needs vLLM's venv.
CHAT_BACKENDS = {"vtw_vllm": "vtw_eval.backends.vllm.VTWVLLM"}


def manifests() -> list:
    """The backends as lmms-eval's ``ModelManifest`` entries (lmms-eval calls this)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=path) for name, path in BACKENDS.items()] + [
        ModelManifest(model_id=name, chat_class_path=path) for name, path in CHAT_BACKENDS.items()
    ]
