"""The LightningModule that trains and tests any step of any method."""
from __future__ import annotations

import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from lightning_modules.methods.base import Method
from lightning_modules.metrics import iou_from_confusion, summarize_step


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite: the run stops rather than train on garbage."""


class IncrementalSegmentationModule(pl.LightningModule):
    """Step `step` of `steps` for `method`: the network being trained, the method's extra modules of
    the step, and at steps >= 1 the frozen old network (handed over by callbacks.teacher).

    The old network is deliberately not a registered submodule: it is not in `parameters()`
    (so not in the optimizer), not in `state_dict()` (not saved as trainable state) and not
    switched to train mode by Lightning. Metrics are logged under "step<t>/..." because the
    global step restarts at every fit.

    lr: the schedule's lr of this step; lr_scale multiplies every parameter group's lr (linear
    scaling with the effective batch, PROTOCOL.md §6), including lrs a method sets absolutely.
    """

    def __init__(self, network: nn.Module, method: Method, steps: list[list[int]], step: int,
                 lr: float, lr_scale: float = 1.0, optimizer: str = "sgd", momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 1e-4, poly_power: float = 0.9, class_names: list[str] | None = None,
                 channels_last: bool = False, compile_network: bool | str = False):
        super().__init__()
        self.network, self.method, self.steps, self.step = network, method, steps, step
        self.lr, self.lr_scale, self.momentum, self.nesterov = lr, lr_scale, momentum, nesterov
        self.optimizer_algorithm = optimizer
        self.weight_decay, self.poly_power = weight_decay, poly_power
        self.class_names = class_names
        self.__dict__["_old_network"] = None  # plain attribute, see the class docstring
        # The method's extra modules of this step (WILSON's localizer), created once the network has
        # its new head (the step loop adds it before building the module).
        self.step_modules = nn.ModuleDict(method.step_modules(network, self.n_old) if step > 0 else {})
        self.pass_totals: dict[str, torch.Tensor] | None = None  # the method's pass before training
        self.pass_restored = False  # whether pass_totals came from a resumed step's checkpoint
        self.test_confusion: np.ndarray | None = None  # filled by a test run
        self.test_iou: np.ndarray | None = None
        self.test_summary: dict | None = None
        # What a test run evaluates, for the logged names: "test" (the test set) or "val" (the
        # held-out part of the training images that hyper-parameter searches optimise).
        self.evaluation_split = "test"
        # Speed settings (trainer.channels_last, trainer.compile): NHWC tensors suit tensor cores
        # under mixed precision; torch.compile fuses the network's forward (a backend name or True).
        self.channels_last, self.compile_network = channels_last, compile_network
        self.unreadable: list[str] = []  # images skipped with data.on_unreadable=skip (this rank)

    # --- the old model ----------------------------------------------------------------------
    @property
    def old_network(self):
        return self.__dict__["_old_network"]

    def set_old_network(self, network) -> None:
        self.__dict__["_old_network"] = network

    @property
    def n_old(self) -> int:
        """Channels of the model before this step (background included)."""
        return sum(len(s) for s in self.steps[: self.step])

    @property
    def num_classes(self) -> int:
        return sum(len(s) for s in self.steps[: self.step + 1])

    # --- training -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.network(images)

    def configure_model(self) -> None:
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last)
            for module in self.step_modules.values():
                module.to(memory_format=torch.channels_last)
        if self.compile_network and getattr(self.network, "_compiled_call_impl", None) is None:
            backend = self.compile_network if isinstance(self.compile_network, str) else "inductor"
            self.network.compile(backend=backend)

    def _to_memory_format(self, batch: dict) -> dict:
        if self.channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    def on_fit_start(self) -> None:
        """The method's pass over the training images, unless a resumed checkpoint holds its totals."""
        if self.step > 0 and self.method.uses_training_pass:
            # Restored from a checkpoint: the step resumes, so its weights are past the pass.
            self.pass_restored = self.pass_totals is not None
            if self.pass_totals is None:
                self.pass_totals = self._training_pass()
            self.method.after_training_pass(self, self.pass_totals)

    @torch.no_grad()
    def _training_pass(self) -> dict[str, torch.Tensor]:
        loader = self.trainer.datamodule.training_pass_dataloader(self.method.training_pass_images)
        totals: dict[str, torch.Tensor] = {}
        was_training = self.training
        self.eval()
        try:
            for batch in loader:
                batch.pop("unreadable", None)
                batch = self._to_memory_format(self.transfer_batch_to_device(batch, self.device, 0))
                with self.trainer.precision_plugin.forward_context():
                    statistics = self.method.training_pass(self, batch)
                for name, value in statistics.items():
                    if value.is_floating_point() and value.dtype != torch.float64:
                        raise TypeError(f"{self.method.name}.training_pass returned a {value.dtype} {name!r}; pass "
                                        "statistics are integers (every process count sums them exactly) or float64 "
                                        "sums (equal to rounding)")
                    totals[name] = totals[name] + value if name in totals else value.clone()
        finally:
            self.train(was_training)
        # Summed over the processes (integers: exact, whatever the order).
        return {name: self.trainer.strategy.reduce(value, reduce_op="sum").cpu() for name, value in totals.items()}

    def on_train_epoch_start(self) -> None:
        self.method.on_train_epoch_start(self)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.method.on_before_optimizer_step(self, optimizer)

    def training_step(self, batch, batch_index):
        self.unreadable += batch.pop("unreadable", None) or []
        batch = self._to_memory_format(batch)
        loss, terms = self.method.training_loss(self, batch)
        if not torch.isfinite(loss):
            detail = ", ".join(f"{name} {float(value.detach()):.4g}" for name, value in terms.items())
            raise NonFiniteLoss(f"non-finite training loss {float(loss.detach())} at step {self.step}, epoch "
                                f"{self.current_epoch}, batch {batch_index} (rank {self.global_rank}); terms: {detail}")
        batch_size = batch["image"].shape[0]
        self.log(f"step{self.step}/train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"step{self.step}/train/{name}", value, batch_size=batch_size)
        return loss

    def build_optimizer(self, total_iterations: int, iterations_per_epoch: int):
        """SGD (or AdamW: optimizer.algorithm) over the method's parameter groups (each lr x
        lr_scale) and the per-iteration lr schedule (poly by default; WILSON's warm-up at its steps
        >= 1): (optimizer, scheduler). What configure_optimizers returns, and what make bench's bare
        loop uses."""
        groups = self.method.parameter_groups(self, self.lr)
        for group in groups:
            group["lr"] = group.get("lr", self.lr) * self.lr_scale
        if self.optimizer_algorithm == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=self.lr * self.lr_scale, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.SGD(groups, lr=self.lr * self.lr_scale, momentum=self.momentum,
                                        nesterov=self.nesterov, weight_decay=self.weight_decay)
        method, power = self.method, self.poly_power
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: method.learning_rate_factor(self, it, total_iterations, iterations_per_epoch, power))
        return optimizer, scheduler

    def configure_optimizers(self):
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        optimizer, scheduler = self.build_optimizer(total, per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- what a training checkpoint holds beyond the weights -------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["method_state"] = self.method.state_dict()
        if self.pass_totals is not None:
            checkpoint["training_pass"] = {k: v.cpu() for k, v in self.pass_totals.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.method.load_state_dict(checkpoint.get("method_state") or {})
        if "training_pass" in checkpoint:
            self.pass_totals = dict(checkpoint["training_pass"])

    # --- testing ------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self.test_confmat = self._confusion_matrix()

    def on_train_epoch_end(self) -> None:
        if self.unreadable:  # every rank reports its own
            warnings.warn(f"step {self.step}, epoch {self.current_epoch}: {len(self.unreadable)} unreadable images "
                           f"skipped so far (data.on_unreadable=skip); first: {self.unreadable[0]}")

    # --- validation during fit (checkpoint.select=best_validation): the held-out training images -----
    def _confusion_matrix(self) -> MulticlassConfusionMatrix:
        return MulticlassConfusionMatrix(self.num_classes, ignore_index=255, validate_args=False).to(self.device)

    def _score(self, confmat: MulticlassConfusionMatrix, batch) -> None:
        batch = self._to_memory_format(batch)
        confmat.update(self.network(batch["image"])["logits"].argmax(dim=1), batch["label"])

    def on_validation_epoch_start(self) -> None:
        self.validation_confmat = self._confusion_matrix()

    def validation_step(self, batch, batch_index):
        self._score(self.validation_confmat, batch)

    def on_validation_epoch_end(self) -> None:
        """selection_score: MBS's rule, the mean IoU of the step's own classes, background
        included at step 0 (all_with_bg there; current_no_bg at steps >= 1), summed over processes."""
        confusion = self.validation_confmat.compute().cpu().numpy().astype(np.int64)
        summary = summarize_step(iou_from_confusion(confusion), self.steps, self.step)
        score = summary["all_with_bg"] if self.step == 0 else summary["current_no_bg"]
        self.selection_score = float("nan") if score is None else float(score)
        self.log(f"step{self.step}/val/selection", self.selection_score)

    def test_step(self, batch, batch_index):
        self._score(self.test_confmat, batch)

    def on_test_epoch_end(self) -> None:
        self.test_confusion = self.test_confmat.compute().cpu().numpy().astype(np.int64)
        iou = iou_from_confusion(self.test_confusion)
        self.test_summary = summarize_step(iou, self.steps, self.step)
        prefix = f"step{self.step}/{self.evaluation_split}"
        self.log_dict({f"{prefix}/{k}": v for k, v in self.test_summary.items() if not np.isnan(v)})
        names = self.class_names or [str(i) for i in range(len(iou))]
        self.log_dict({f"{prefix}_iou/{names[i]}": float(v) for i, v in enumerate(iou) if not np.isnan(v)})
        self.test_iou = iou
