"""What a method is, and every hook through which it reaches the step loop, the data and Lightning.

A method is one file under lightning_modules/methods/ defining a dataclass subclass of `Method`
(its fields are its hyper-parameters, checked by name, type and range at load) and ending with
`METHOD = <the class>`. Nothing else in the suite names a method. The hooks, in the order a step
meets them (every hook has a default that does nothing special):

  what it is        class attributes: name, supervision, training_images, old_labels,
                    uses_old_model, step0_loss; `settings` (its own data / optimisation settings,
                    merged over the experiment's: experiments/config.py)
  its network       build_network(settings, classes_per_step, pretrained)
  step 0            step0_key() (what makes its step-0 model its own: part of the cache key),
                    step0_training_loss(module, batch), parameter_groups and
                    learning_rate_factor (also at step 0)
  before a step     init_new_classifier(network, old_network): after the new head is added
                    step_modules(network, n_old): extra trainable modules of the step
                    stage_key(context) / run_stage(context, directory): an extra stage before
                      training (e.g. train a classifier and write pseudo-masks), run once by
                      rank 0 into a cached directory
                    training_data(context, default): the step's training sources (e.g. a
                      replay pool beside the step's images, pseudo-masks instead of no mask)
                    training_epochs(context, epochs, updates_per_epoch): the step's length (RECALL's
                      iterations per new class)
                    training_pass(module, batch) / after_training_pass(module, totals): one pass
                      over the step's training images (augmented, or whole: training_pass_images)
                      before training, statistics summed over processes, kept in the step's
                      checkpoint
  while training    training_loss(module, batch) (step 0 / incremental_training_loss),
                    on_train_epoch_start(module), on_before_optimizer_step(module, optimizer)
  across steps      carried state: state_dict() / load_state_dict(); saved with the step's
                    network, in every training checkpoint, and beside a shared step-0 model
  reporting         pseudo_labels(module, images, new_labels, labels), stored_pseudo_mask(image_id)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lightning_modules.losses import bce_one_hot, cross_entropy
from lightning_modules.schedules import poly_factor

if TYPE_CHECKING:
    from lightning_modules.network import SegmentationNetwork


class MethodUnavailable(RuntimeError):
    """A method that cannot run here (an input it needs is missing, or an optional package): one
    line saying what and how to get it. experiments.run stops that method only; the other methods
    of the experiment still run. Raise it where every process meets it (e.g. in stage_key), so that
    no process waits for another that has stopped."""


@dataclass
class StepContext:
    """What the stage and data hooks of a step may use. `datamodule` is the step's
    IncrementalSegmentationDataModule after setup (its train rows, presence tables, dataset files and
    builders); `old_network` the frozen previous model (None at step 0); `stage_directory` the
    step's stage output when the method has a stage (else None); rank and world size of the
    process."""
    config: Any                     # experiments.config.RunConfig
    steps: list[list[int]]
    step: int
    datamodule: Any = None
    old_network: Any = None
    stage_directory: Any = None
    rank: int = 0
    world_size: int = 1


@dataclass
class Method:
    """Base of every method; see the module docstring. Subclasses are dataclasses."""

    name: ClassVar[str] = "base"
    supervision: ClassVar[str] = "pixel"        # at steps >= 1: "pixel" masks or "image" labels only
    training_images: ClassVar[str] = "step"     # "step" (this step's images) or "cumulative" (Joint)
    old_labels: ClassVar[str] = "background"    # old classes in training masks: "background" or "kept"
    uses_old_model: ClassVar[bool] = False      # whether the frozen previous model is needed at steps >= 1
    step0_loss: ClassVar[str] = "ce"            # "ce" (softmax CE, most methods) or "bce" (WILSON, LwF-MC)
    # Overrides of the experiment's sections that define the method (experiments/config.py), e.g.
    # {"data": {"void_as_background": False}}; an experiment file's entry overrides them in turn.
    settings: ClassVar[dict] = {}
    # Hyper-parameters under which every training iteration computes the method's full loss (make
    # bench measures one such iteration; e.g. WILSON's pseudo-labels from epoch 0).
    full_loss_hparams: ClassVar[dict] = {}
    # Hyper-parameters added after the method's runs existed, with their defaults: left out of a run's
    # id while at the default (experiments.store.identity), so earlier results are found again.
    later_defaults: ClassVar[dict] = {}

    def __post_init__(self):
        self.carried: dict[str, torch.Tensor] = {}   # state carried from step to step (state_dict)

    def hparams(self) -> dict:
        return dataclasses.asdict(self)

    # --- the network --------------------------------------------------------------------------
    def build_network(self, settings, classes_per_step: list[int], pretrained: bool = True) -> "SegmentationNetwork":
        """The method's network from `settings` (the run's network section). pretrained=False: the
        network is about to receive a saved state, so no encoder weights are loaded for it."""
        from lightning_modules.network import build_network

        return build_network(settings, classes_per_step, pretrained)

    def load_network(self, settings, state: dict) -> "SegmentationNetwork":
        """A network saved with network.state(), rebuilt with this method's builder."""
        network = self.build_network(settings, state["classes_per_step"], pretrained=False)
        network.load_state_dict(state["state_dict"])
        return network

    # --- step 0 -------------------------------------------------------------------------------
    def step0_key(self) -> dict:
        """What, beyond the run's data, network, step-0 schedule, optimizer and precision, makes this
        method's step-0 model what it is (experiments.step0_cache keys the cached models with it):
        methods with equal keys share one step-0 model. By default the step-0 loss."""
        return {"loss": self.step0_loss}

    def step0_training_loss(self, module, batch) -> tuple[torch.Tensor, dict]:
        """Step 0 is fully supervised: softmax cross-entropy (step0_loss "ce") or per-class BCE
        on one-hot targets (step0_loss "bce", WILSON and LwF-MC), on the upsampled logits."""
        logits = module.network(batch["image"])["logits"]
        if self.step0_loss == "bce":
            loss = bce_one_hot(logits, batch["label"])
            return loss, {"bce": loss}
        loss = cross_entropy(logits, batch["label"])
        return loss, {"ce": loss}

    # --- the start of a step t >= 1 -----------------------------------------------------------
    def init_new_classifier(self, network, old_network) -> None:
        """Called once the network has its new head, before the optimizer is built. The default
        keeps PyTorch's default initialisation of the new 1x1 conv (WILSON, FT, LwF, ...)."""

    def step_modules(self, network, n_old: int) -> dict[str, nn.Module]:
        """Extra trainable modules for a step t >= 1 (e.g. WILSON's localizer), registered on the
        LightningModule (`module.step_modules[name]`) so Lightning moves, trains and checkpoints
        them; they are not part of the network, so the next step's old model does not contain them."""
        return {}

    def stage_key(self, context: StepContext) -> dict | None:
        """None: no extra stage (the default). Else what determines the stage's output (e.g. the
        pseudo-masks of a weakly-supervised baseline): the stage runs once into a directory keyed
        by it (experiments.stages), and is reused by any later run with the same key."""
        return None

    def run_stage(self, context: StepContext, directory) -> None:
        """The extra stage, run by rank 0 only, before the step's training, writing into
        `directory` (which may hold the files of an interrupted earlier start: skip what is
        done). The stage sees the step's training images with image-level labels only when the
        method is weakly supervised."""
        raise NotImplementedError(f"{self.name} declares a stage (stage_key) but no run_stage")

    def training_data(self, context: StepContext, default):
        """The step's training sources, a datamodules.incremental.TrainingSources; `default` is the
        step's images with their labels (the method's supervision). A method may add a source
        (RECALL's replay pool: global batches alternate between the sources) or replace the
        labels (a weak baseline's pseudo-masks from its stage directory)."""
        return default

    def training_epochs(self, context: StepContext, epochs: int, updates_per_epoch: int) -> int:
        """The epochs of a step t >= 1: the experiment's schedule by default. A method whose code
        counts its schedule otherwise (RECALL: iterations per new class) converts it here;
        updates_per_epoch is the number of optimizer updates in one epoch of the step's training
        sources. (Step 0 always follows the schedule, which keys the cached step-0 model.)"""
        return epochs

    # --- the pass over the training images before training --------------------------------------
    uses_training_pass: ClassVar[bool] = False
    # What the pass sees: "train" (the train transform, training batches) or "full" (whole images
    # and labels, no augmentation, one per batch: PIFS's imprinting on the official `train_dst_no_aug`)
    training_pass_images: ClassVar[str] = "train"

    def training_pass(self, module, batch) -> dict[str, torch.Tensor]:
        """With uses_training_pass: called on every batch of one pass over the step's training
        images (the train transform, seeded; old model in eval mode, no gradients) before the
        first epoch (images: training_pass_images). Returns integer tensors, summed over the batches
        and over the processes, so that 1 and N processes get identical totals; float64 tensors
        (sums of features) are summed the same way, equal up to rounding."""
        raise NotImplementedError

    def after_training_pass(self, module, totals: dict[str, torch.Tensor]) -> None:
        """The summed statistics of training_pass (also after a resume: they are kept in the
        step's training checkpoint, so the pass is not run again; `module.pass_restored` is then
        True, and the network's weights are the checkpoint's, past anything set here before)."""

    # --- optimisation ---------------------------------------------------------------------------
    def parameter_groups(self, module, lr: float) -> list[dict]:
        """Optimizer groups over the network and the step modules, each with its lr, for the
        schedule's lr `lr`. Every group's lr is then scaled with the effective batch (PROTOCOL.md
        §6) by the module, absolute ones too. By default one group at `lr`."""
        params = [*module.network.parameters(), *module.step_modules.parameters()]
        return [{"params": [p for p in params if p.requires_grad], "lr": lr}]

    def learning_rate_factor(self, module, iteration: int, total_iterations: int, iterations_per_epoch: int,
                             power: float) -> float:
        """Multiplier of every group's lr at `iteration`; by default the poly decay."""
        return poly_factor(iteration, total_iterations, power)

    # --- training -------------------------------------------------------------------------------
    def incremental_training_loss(self, module, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def training_loss(self, module, batch) -> tuple[torch.Tensor, dict]:
        if module.step == 0:
            return self.step0_training_loss(module, batch)
        return self.incremental_training_loss(module, batch)

    def on_train_epoch_start(self, module) -> None:
        """At the start of every training epoch of every step."""

    def on_before_optimizer_step(self, module, optimizer) -> None:
        """After the backward pass, before every optimizer step (e.g. an importance estimate from
        the gradients)."""

    # --- state carried across steps -------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The carried state (`self.carried`): tensors that outlive a step (SDR's prototypes, EWC's
        importance). Saved atomically with the step's network, in every training checkpoint
        (updated every batch, a kill mid-step resumes it too) and, after step 0, beside the cached
        step-0 model (keyed by that model and this method's hyper-parameters, never inside the
        shared file: experiments.step0_cache). A state that only the step-0 training itself can
        produce (accumulated during it) must make that model the method's own through step0_key()."""
        return {k: v.detach().cpu().clone() for k, v in self.carried.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.carried = {k: v.clone() for k, v in state.items()}

    # --- reporting --------------------------------------------------------------------------------
    def stored_pseudo_mask(self, image_id: str):
        """The pseudo-mask a method wrote for one of the step's training images (dataset ids, 255
        abstained), for the pseudo-label IoU report (experiments.reporting.pseudo_masks); None for
        methods that make their labels while training (the report then calls pseudo_labels)."""
        return None

    def pseudo_labels(self, module, images: torch.Tensor, new_labels: torch.Tensor,
                      labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """What the method trains the network on at a step t >= 1 when it makes its own labels
        (WILSON's localizer, a weak baseline's pseudo-masks), as hard labels: (B, H, W) channel ids
        at the images' resolution, for the qualitative figure drawn on test images. new_labels
        (B, new classes): the images' multi-hot labels; labels (B, H, W): the test images' pixel
        labels (channel ids, 255 void), for methods whose labels depend on them (MBS's
        pseudo-labels keep the ground truth of new classes). None for methods trained on the
        ground truth alone."""
        return None
