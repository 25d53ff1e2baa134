"""The held-out validation split that hyper-parameter searches optimise (never the test set)."""
import numpy as np
import pytest

from datamodules.incremental import IncrementalSegmentationDataModule, validation_rows
from experiments import run
from experiments.config import ConfigError, apply_overrides


def test_validation_rows_are_a_fixed_fraction_of_the_train_split():
    rows = validation_rows(200, 0.1)
    assert len(rows) == 20 and len(set(rows.tolist())) == 20 and rows.min() >= 0 and rows.max() < 200
    assert rows.tolist() == sorted(rows.tolist())
    assert np.array_equal(rows, validation_rows(200, 0.1)), "the same rows at every step and for every method"
    assert validation_rows(200, 0.0).size == 0


def test_held_out_images_never_train_and_are_scored_on_every_seen_class(tiny_config):
    data = tiny_config.data
    common = dict(dataset="synthetic", data_root=data.root, task="15-5", mode="disjoint", crop_size=32,
                  num_workers=0, dataset_options=data.options)
    plain = IncrementalSegmentationDataModule(step=1, **common)
    plain.setup()
    held = IncrementalSegmentationDataModule(step=1, validation_fraction=0.25, **common)
    held.setup()
    rows = validation_rows(48, 0.25)
    assert held.train_indices.tolist() == sorted(set(plain.train_indices.tolist()) - set(rows.tolist()))
    assert set(held.val_indices.tolist()) <= set(rows.tolist())
    # Validation images: those of the held-out rows with a seen class, labelled like the test set
    # (old classes kept, not background as in step-1 training).
    seen = [r for r in rows if held.train_presence[r, :20].any()]
    assert held.val_indices.tolist() == seen
    labels = np.concatenate([held.val_set[i]["label"].numpy().ravel() for i in range(len(held.val_set))])
    old_channels = set(range(1, 16))
    assert old_channels & set(np.unique(labels).tolist()), "old classes are scored, not turned into background"
    with pytest.raises(ValueError, match="validation_fraction"):
        IncrementalSegmentationDataModule(validation_fraction=1.0, **common)


def test_a_run_reports_final_validation_metrics_beside_the_test_ones(tiny_config):
    config = apply_overrides(tiny_config, ["data.validation_fraction=0.25", "methods=[ft]"])
    results = run.run_experiment(config)["ft"]
    assert all(step["validation"]["images"] > 0 for step in results["steps"])
    assert set(results["final_validation"]) == set(results["final"])
    assert results["final_validation"]["all_no_bg"] != results["final"]["all_no_bg"], "another set of images"


def test_the_test_crop_may_differ_from_the_training_crop(tiny_config):
    """WILSON's COCO script: 448 training crops, 512 test crops (data.eval_crop_size)."""
    data = tiny_config.data
    module = IncrementalSegmentationDataModule(dataset="synthetic", data_root=data.root, task="15-5", step=0,
                                               crop_size=24, eval_crop_size=32, num_workers=0,
                                               dataset_options=data.options)
    module.setup()
    assert module.train_set[0]["image"].shape[-2:] == (24, 24)
    assert module.test_set[0]["image"].shape[-2:] == (32, 32)


def test_best_validation_selection_hands_on_the_best_scored_epoch(tiny_config):
    """checkpoint.select=best_validation (MBS's rule on held-out images, never the test set): the
    model a step hands on scores, when evaluated again after the step, exactly the best of the
    scores of its epochs; the record names that epoch."""
    config = apply_overrides(tiny_config, ["data.validation_fraction=0.25", "methods=[ft]",
                                           "checkpoint.select=best_validation", "schedule.step0={epochs: 4, lr: 0.05}",
                                           "schedule.incremental={epochs: 3, lr: 0.01}"])
    results = run.run_experiment(config)["ft"]
    for record, key, epochs in zip(results["steps"], ("all_with_bg", "current_no_bg"), (4, 3)):
        selection = record["selection"]
        scores = [entry["score"] for entry in selection["history"]]
        assert [entry["epoch"] for entry in selection["history"]] == list(range(1, epochs + 1))
        if record["step"] == 0:   # (the tiny step 1 may not learn its new classes at all: all 0)
            assert len(set(scores)) > 1, "the epochs score differently: the choice is a real one"
        best = max(range(epochs), key=lambda i: (scores[i], -i))   # the first of equal best scores
        assert selection["epoch"] == best + 1 and selection["score"] == scores[best]
        assert record["validation"]["summary"][key] == pytest.approx(scores[best], abs=1e-9)


def test_selection_needs_held_out_images(tiny_config):
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        apply_overrides(tiny_config, ["checkpoint.select=best_validation"])


def test_selection_state_survives_a_checkpoint_round_trip():
    """What a step's Lightning checkpoint keeps of the selection (a resumed step selects among all
    of its epochs, the ones before the kill included), and the best state goes back into the network."""
    from types import SimpleNamespace

    import torch

    from callbacks.selection import BestValidationState

    network = torch.nn.Linear(2, 1)
    module = SimpleNamespace(network=network, selection_score=0.0)
    callback = BestValidationState()
    for epoch, score, weight in ((0, 0.2, 1.0), (1, 0.5, 2.0), (2, 0.4, 3.0)):
        with torch.no_grad():
            network.weight.fill_(weight)
        module.selection_score = score
        callback.on_validation_end(SimpleNamespace(sanity_checking=False, current_epoch=epoch), module)
    resumed = BestValidationState()
    resumed.load_state_dict(callback.state_dict())
    resumed.on_fit_end(None, module)
    assert resumed.record()["epoch"] == 2 and resumed.record()["score"] == 0.5
    assert [e["score"] for e in resumed.record()["history"]] == [0.2, 0.5, 0.4]
    assert torch.all(network.weight == 2.0)
