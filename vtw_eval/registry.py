"""lmms-eval model registration (entry-point group ``lmms_eval.models``).

lmms-eval loads this while ``lmms_eval.models`` is still initialising, so it imports only the
manifest type: importing ``lmms_eval.models`` here, or torch, would break plugin loading.
"""

from lmms_eval.models.registry_v2 import ModelManifest


def manifests() -> list[ModelManifest]:
    return [ModelManifest(model_id="vtw_llava", simple_class_path="vtw_eval.backends.llava.VTWLlava")]
