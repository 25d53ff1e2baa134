"""Loss functions, as plain functions of tensors: the public namespace.

Every loss a method or an issue names is importable from here (`lightning_modules.losses.<name>`,
with the signature it was given), whichever submodule holds it:
  supervised        softmax CE, MiB's unbiased CE, per-class BCE on one-hot labels
  distillation      knowledge distillation from the old model (MiB's unbiased KD, ...)
  weak_supervision  learning from image-level labels (WILSON's terms, nGWP, PAMR, ...)
  plop              PLOP's entropy pseudo-labels and thresholds, Local POD
  sdr               SDR's prototypes, prototype matching, clustering, sparsity
  mbs               MBS's selective pseudo-labels, adaptive feature and label-guided distillation,
                    orthogonal loss
  recall            RECALL's background inpainting of the new step's labels
  pifs              weight imprinting from prototypes, PIFS's prototype distillation

Shapes: logits (B, C, H, W) over the C channels of the current model, in the order
[bg, step-0 classes, step-1 classes, ...]; labels (B, H, W) of channel indices, 255 ignored.
"""
from lightning_modules.losses.distillation import *  # noqa: F401,F403
from lightning_modules.losses.supervised import *  # noqa: F401,F403
from lightning_modules.losses.weak_supervision import *  # noqa: F401,F403
from lightning_modules.losses.plop import *  # noqa: F401,F403,E402
from lightning_modules.losses.sdr import *  # noqa: F401,F403,E402
from lightning_modules.losses.mbs import *  # noqa: F401,F403,E402
from lightning_modules.losses.recall import *  # noqa: F401,F403,E402
from lightning_modules.losses.pifs import *  # noqa: F401,F403,E402
