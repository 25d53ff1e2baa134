"""A broken setup (e.g. the CUDA torchvision next to the CPU torch without the shim) fails here first."""
import subprocess
import sys


def test_every_design_card_library_imports_in_a_fresh_interpreter():
    code = ("import torch, torchvision, pytorch_lightning, torchmetrics, segmentation_models_pytorch, "
            "albumentations, wandb, pytest, timm; print(torch.__version__, torchvision.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
