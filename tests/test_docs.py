"""The documentation's code runs: the worked example of docs/adding-a-method.md (the method file on
the page, exactly as written there) through the real step loop, and its loss by hand."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import torch

from experiments import run
from experiments.config import apply_overrides
from experiments.store import run_directory
from lightning_modules.methods import METHODS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def page_method_file(tmp_path) -> Path:
    """The first python block after the worked example's heading, written out as a module file."""
    page = (DOCS / "adding-a-method.md").read_text()
    example = page[page.index("## A worked example"):]
    code = re.search(r"```python\n(.*?)```", example, re.S).group(1)
    path = tmp_path / "confident_ft.py"
    path.write_text(code)
    return path


def load_page_method(tmp_path):
    spec = importlib.util.spec_from_file_location("docs_confident_ft", page_method_file(tmp_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses resolve the file's annotations through it
    spec.loader.exec_module(module)
    return module


def test_the_worked_example_relabels_only_confident_background_pixels(tmp_path):
    module = load_page_method(tmp_path)
    labels = torch.tensor([[[0, 0, 0, 16, 255]]])                     # 1 x 1 x 5 pixels
    # old model over (bg, 1, 2): p = softmax; pixel 0: class 2 at 0.8; 1: class 1 at 0.6;
    # 2: background at 0.9; 3: class 1 at 0.9 but labelled new class 16; 4: void
    probabilities = torch.tensor([[0.1, 0.1, 0.8], [0.3, 0.6, 0.1], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05],
                                  [0.05, 0.9, 0.05]])
    old_logits = probabilities.log().T.reshape(1, 3, 1, 5)
    relabelled = module.relabel_confident_background(labels, old_logits, threshold=0.7)
    assert relabelled.tolist() == [[[2, 0, 0, 16, 255]]]
    assert module.relabel_confident_background(labels, old_logits, threshold=0.5).tolist() == [[[2, 1, 0, 16, 255]]]


def test_the_worked_example_runs_through_the_step_loop_beside_ft(tiny_config, tmp_path, monkeypatch):
    """Registered from the page's file, it runs as any method: its hyper-parameter from an override,
    FT's CE step-0 model shared, every step tested, results written."""
    module = load_page_method(tmp_path)
    monkeypatch.setitem(METHODS, "confident_ft", module.METHOD)
    config = apply_overrides(tiny_config, ["methods=[ft,confident_ft]", "methods.confident_ft.threshold=0.5"])
    results = run.run_experiment(config)
    assert set(results) == {"ft", "confident_ft"}
    saved = json.loads((run_directory(config.run_config("confident_ft")) / "results.json").read_text())
    assert saved["complete"] and len(saved["steps"]) == 2 and saved["hparams"] == {"threshold": 0.5}
    models = [p for p in Path(config.cache_dir).glob("step0-*.pt") if "." not in p.stem]
    assert len(models) == 1   # one CE step-0 model for both
