"""The old model: a frozen, untouched copy made before the classifier grows, handed over by the
teacher callback."""
import copy

import pytorch_lightning as pl
import torch

from callbacks.teacher import TeacherCallback
from datamodules.incremental import IncrementalSegmentationDataModule
from lightning_modules.methods import build_method
from lightning_modules.module import IncrementalSegmentationModule
from lightning_modules.network import SegmentationNetwork
from tests.conftest import start_step

SMALL_NET = dict(encoder="tu-resnet10t", encoder_depth=3, output_stride=8, atrous_rates=(2, 4, 6), decoder_channels=16)


class _OldModelProbe(pl.Callback):
    """Records the state of the old model during training."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        old = module.old_network
        self.seen.append({"training": old.training, "grads": [p.grad for p in old.parameters()],
                          "requires_grad": any(p.requires_grad for p in old.parameters())})


def test_old_model_frozen_unchanged_and_outside_the_optimizer(tmp_path):
    torch.manual_seed(0)
    network = SegmentationNetwork([16], **SMALL_NET)
    before = copy.deepcopy(network.state_dict())
    steps = [list(range(16)), [16, 17, 18, 19, 20]]
    dm = IncrementalSegmentationDataModule(dataset="synthetic", data_root=tmp_path, task="15-5", step=1,
                                           batch_size=4, crop_size=32, num_workers=0,
                                           dataset_options={"synthetic": {"train": 48, "val": 8, "size": 40}})
    method = build_method("mib")
    old = start_step(network, method, 5)
    module = IncrementalSegmentationModule(network, method, steps, step=1, lr=0.05)
    probe = _OldModelProbe()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[TeacherCallback(old), probe])
    trainer.fit(module, datamodule=dm)

    assert module.old_network is old and old is not module.network
    for name, value in old.state_dict().items():  # not one weight of the teacher moved
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(v, before[k]) for k, v in module.network.state_dict().items() if k in before), \
        "the student did not train, so the test proves nothing"
    assert len(probe.seen) == 3
    for record in probe.seen:
        assert record["training"] is False and record["requires_grad"] is False
        assert all(g is None for g in record["grads"])
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in old.parameters()}
    assert not any(k.startswith("_old") or "old_network" in k for k in module.state_dict())
    # the classifier grew by the 5 new classes; the teacher kept the step-0 classifier
    assert module.network.classifier.classes_per_step == [16, 5]
    assert old.classifier.classes_per_step == [16]


def test_methods_without_a_teacher_get_none_but_still_a_new_head(tmp_path):
    network = SegmentationNetwork([16], **SMALL_NET)
    method = build_method("ft")
    old = start_step(network, method, 2)
    module = IncrementalSegmentationModule(network, method, [list(range(16)), [16, 17]], step=1, lr=0.01)
    TeacherCallback(old).setup(None, module, "fit")
    assert old is None and module.old_network is None and network.classifier.classes_per_step == [16, 2]


def test_the_frozen_copy_is_detached_from_the_live_network_even_when_compiled():
    """The old model is a deep copy in eval mode without gradients; a compiled call of the live
    network is not copied into it (it would still run the live network)."""
    torch.manual_seed(0)
    network = SegmentationNetwork([4], **SMALL_NET)
    network.compile(backend="eager")
    old = network.frozen_copy()
    assert old._compiled_call_impl is None and network._compiled_call_impl is not None
    assert not old.training and not any(p.requires_grad for p in old.parameters())
    with torch.no_grad():
        next(network.parameters()).add_(1.0)  # the live network moves; the copy does not
    assert not torch.equal(next(network.parameters()), next(old.parameters()))
