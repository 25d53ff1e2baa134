"""Make the registry's (CUDA-built) torchvision wheel importable next to a CPU-only torch.

torchvision 0.28.0 on PyPI links libtorch_cuda, so its compiled ops do not load against the CPU
torch wheel, and `torchvision/_meta_registrations.py` then fails at import with
"operator torchvision::nms does not exist" (shared/docs/ENV.md §2). On the first
`import torchvision` this hook tries torchvision's own `_C` library; only if that fails does it
define the `nms`/`qnms` schemas (nms with a slow pure-PyTorch CPU kernel) so the import works.
Nothing in this suite uses nms; the point is that torchvision, timm, smp, torchmetrics and
Lightning import at all. Installed as a `.pth` hook by scripts/setup_torchvision.py, and only on
machines where torchvision fails to import without it.
"""
import importlib.abc
import sys

_LIBRARY = None  # keeps the torch.library.Library alive for the process lifetime


def _nms_cpu(dets, scores, iou_threshold):
    import torch

    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    keep = []
    for i in scores.argsort(descending=True).tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        inter = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0) * (
            torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)
        ).clamp(min=0)
        suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def ensure_torchvision_ops():
    """Define torchvision's op schemas if its compiled library cannot load. True if it did."""
    global _LIBRARY
    import glob
    import importlib.util
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    for library in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(library)
            return False  # the real ops loaded: nothing to do (e.g. a CUDA install)
        except OSError:
            pass
    try:
        torch.ops.torchvision.nms
        return False
    except (AttributeError, RuntimeError):
        pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.impl("nms", _nms_cpu, "CPU")
    return True


class _FirstImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_ops()
        return None


def install():
    if "torchvision" not in sys.modules and not any(
        isinstance(finder, _FirstImportHook) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _FirstImportHook())
