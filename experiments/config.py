"""Experiment configuration as typed data: one schema per section, with its defaults and ranges here
and nowhere else.

    experiments/<name>.yaml  ->  load_experiment (a raw dict; `base:` merged)
                             ->  apply_overrides (key=value, values parsed as YAML)
                             ->  resolve          (validated: an `Experiment`; DATA_ROOT filled in)
    Experiment.run_config(method) -> RunConfig    (what one method's run uses)

Every problem is a `ConfigError` (a ValueError) with one line naming the key: an unknown key (a typo
never silently runs the default), a wrong type, a value out of range, malformed YAML. Validation
happens before anything is written or trained.

A method brings its own settings in two places, merged in this order over the experiment's sections:
its class's `settings` (e.g. PLOP keeps void as 255 in training) and the experiment file's entry,
`methods.<name>.<section>.<key>` for the sections `data`, `network`, `schedule`, `optimizer` and
`trainer.precision` (e.g. SDR's batch 8, WILSON's fp16 autocast in the GPU files). The other keys
of an entry are the method's hyper-parameters, checked against its dataclass fields and types.

The lr of a schedule is for `optimizer.reference_batch` images per update: by default the batch size
the file gives (the experiment's, or a method's own), fixed before any override, so that
`data.batch_size=8` on the command line scales the lr (PROTOCOL.md §6) instead of redefining it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator

EXPERIMENTS_DIR = Path(__file__).resolve().parent
# Sections a method entry may carry to override the experiment's (trainer: precision only; the
# process layout is one for the whole experiment).
METHOD_SECTIONS = ("data", "network", "schedule", "optimizer", "trainer")
METHOD_TRAINER_KEYS = ("precision",)
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed")

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class ConfigError(ValueError):
    """A bad experiment name, override or value; the message is one line for the user."""


class Section(BaseModel):
    """Strict: no unknown keys, no silent type conversion (YAML already gives typed values); frozen:
    the code reads a configuration, it never edits one."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FewShotConfig(Section):
    """The incremental few-shot protocol of PIFS (datamodules/fewshot.py): the base step on every
    image without a non-base class, each later step on `nshot` images per novel class, draw
    `ishot` (images ishot*20 ... of the class's list)."""
    nshot: Annotated[int, Field(ge=1, le=20)] = 5
    ishot: NonNegativeInt = 0
    # Each class's image list: in the training list's order, or the official VOC / COCO lists (the
    # official draws; `make data DATASET=voc|coco` fetches them)
    class_lists: Literal["file_order", "official"] = "file_order"


class DataConfig(Section):
    dataset: Literal["voc", "ade", "coco-voc", "coco", "synthetic"]
    root: str | None = None                        # null: $DATA_ROOT, else ./data
    task: str | list[list[int]]                    # "15-5", or a class order like [[0, 1, 2], [3]]
    mode: Literal["disjoint", "overlap"]
    crop_size: PositiveInt
    eval_crop_size: PositiveInt | None = None      # the test crop when it differs (WILSON's COCO: 448 / 512)
    train_scale: Annotated[list[PositiveFloat], Field(min_length=2, max_length=2)] = [0.5, 2.0]
    eval_mode: Literal["center_crop", "full"] = "center_crop"
    test_images: Literal["seen", "all"] = "seen"
    void_as_background: bool = True               # MiB/WILSON code trains void as background
    future_classes_in_test: Literal["ignore", "background"] = "ignore"
    batch_size: PositiveInt                        # per process
    test_batch_size: PositiveInt | None = None
    num_workers: Literal["auto"] | NonNegativeInt = "auto"
    options: dict[str, Any] = {}                   # the dataset's own (synthetic sizes, partition files, ...)
    validation_fraction: Fraction = 0.0            # held-out training images for hyper-parameter searches
    on_unreadable: Literal["stop", "skip"] = "stop"  # an image that breaks during training
    # Keep decoded images and masks in memory (each file decoded once per process): for datasets
    # that fit in memory, like the embedded one (datamodules.incremental.DecodedCache).
    cache_decoded: bool = False
    fewshot: FewShotConfig | None = None           # PIFS's incremental few-shot steps (null: the usual steps)


# The keys of each network kind (the others are ignored by it, and left out of its identity).
DEEPLAB_KEYS = ("arch", "encoder_depth", "output_stride", "atrous_rates", "decoder_channels", "aspp_dropout")
SEGMENTER_KEYS = ("image_size", "patch_size", "vit_width", "vit_depth", "vit_heads", "decoder_layers",
                  "decoder_drop_path")


class NetworkConfig(Section):
    """kind "deeplab": an smp encoder (`encoder`) + DeepLabV3(+) and the incremental 1x1 classifier
    (lightning_modules/network.py). kind "segmenter": timm's ViT `encoder` + the incremental mask
    transformer (lightning_modules/segmenter.py, MBS's network); `encoder_weights` is then a timm
    pretrained tag (e.g. augreg_in21k_ft_in1k). `encoder_weights: null` trains from scratch."""
    kind: Literal["deeplab", "segmenter"] = "deeplab"
    arch: Literal["deeplabv3", "deeplabv3plus"] = "deeplabv3"
    encoder: str = "resnet101"
    encoder_depth: Annotated[int, Field(ge=1, le=5)] = 5
    output_stride: Literal[8, 16, 32] = 16
    atrous_rates: Annotated[list[PositiveInt], Field(min_length=3, max_length=3)] = [6, 12, 18]
    decoder_channels: PositiveInt = 256
    aspp_dropout: Fraction = 0.0
    encoder_weights: str | None = None
    # Segmenter: the ViT's input size (its position embeddings; other input sizes interpolate them,
    # as Segmenter does), patch size, and the width / depth / heads when they differ from the timm
    # model's own (null: the model's; set for the embedded dataset's small ViT, trained from scratch)
    image_size: PositiveInt = 512
    patch_size: PositiveInt = 16
    vit_width: PositiveInt | None = None
    vit_depth: PositiveInt | None = None
    vit_heads: PositiveInt | None = None
    decoder_layers: PositiveInt = 2                # the mask transformer's blocks
    decoder_drop_path: Fraction = 0.1              # their stochastic depth, 0 ... this value

    @property
    def stride(self) -> int:
        """Input pixels per output pixel: what evaluation pads full images to a multiple of."""
        return self.patch_size if self.kind == "segmenter" else self.output_stride

    def identity(self) -> dict:
        """The keys that shape this kind of network: the DeepLab identity is what it was before the
        Segmenter existed, so earlier runs and cached step-0 models keep their ids."""
        values = self.model_dump()
        if self.kind == "deeplab":
            return {k: v for k, v in values.items() if k not in SEGMENTER_KEYS and k != "kind"}
        return {k: v for k, v in values.items() if k not in DEEPLAB_KEYS}


VIT_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}


def network_label(network: dict) -> str:
    """A short name of a run's network (a NetworkConfig or its saved dict), for the tables: a row
    never hides whether it is a ResNet or a ViT row. "DeepLabV3 R-101", "Segmenter ViT-B/16", or
    "Segmenter ViT w64 d4 p4" for a ViT of its own shape (width, depth, patch)."""
    network = network.model_dump() if hasattr(network, "model_dump") else dict(network or {})
    if not network:   # a results file of the layout before networks were recorded
        return "-"
    encoder = str(network.get("encoder", "")).removeprefix("tu-")
    if network.get("kind", "deeplab") == "segmenter":
        if network.get("vit_width") or network.get("vit_depth"):   # the timm name would mislead
            shape = [f"{letter}{network[key]}" for letter, key in (("w", "vit_width"), ("d", "vit_depth"))
                     if network.get(key)]
            return f"Segmenter ViT {' '.join(shape)} p{network.get('patch_size')}"
        named = re.fullmatch(r"vit_(\w+?)_patch(\d+)_\d+", encoder)
        if named and named.group(1) in VIT_SIZES and int(named.group(2)) == network.get("patch_size", 16):
            return f"Segmenter ViT-{VIT_SIZES[named.group(1)]}/{named.group(2)}"
        return f"Segmenter {encoder} p{network.get('patch_size')}"
    arch = {"deeplabv3": "DeepLabV3", "deeplabv3plus": "DeepLabV3+"}.get(network.get("arch"), network.get("arch"))
    resnet = re.fullmatch(r"resnet(\d+\w*)", encoder)
    return f"{arch} {'R-' + resnet.group(1) if resnet else encoder}"


class StepSchedule(Section):
    epochs: PositiveInt
    lr: PositiveFloat


class IncrementalSchedule(StepSchedule):
    """A step t >= 1's schedule. `iterations`, when set, gives its length in optimizer updates, as
    PIFS's scripts do (1,000 on VOC): the step trains max(1, iterations // updates per epoch) epochs
    (the official run.py's rule), and `epochs` is not used. A few-shot step's epoch is 20 // nshot
    passes over its shots, each reshuffled, as the official loop.
    `batch_size`, when set, is the per-process batch of the steps >= 1 (PIFS's scripts: 24 at the
    base step, 10 after); `lr` is then the lr at that batch (linear scaling only with processes and
    accumulation)."""
    iterations: PositiveInt | None = None
    batch_size: PositiveInt | None = None


class ScheduleConfig(Section):
    step0: StepSchedule
    incremental: IncrementalSchedule


class OptimizerConfig(Section):
    """SGD (every method's code; momentum and nesterov) or AdamW (betas 0.9 / 0.999; momentum and
    nesterov unused): the embedded dataset's ViT, trained from scratch, which SGD does not train."""
    algorithm: Literal["sgd", "adamw"] = "sgd"
    momentum: Fraction = 0.9
    nesterov: bool = True
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    poly_power: Annotated[float, Field(ge=0)] = 0.9
    scale_lr: bool = True
    reference_batch: PositiveInt | None = None     # filled in at load: the file's batch size

    def identity(self) -> dict:
        """The settings that shape training; an SGD identity is what it was before AdamW existed,
        so earlier runs and cached step-0 models keep their ids."""
        values = self.model_dump()
        if self.algorithm == "sgd":
            values.pop("algorithm")
        return values


class TrainerConfig(Section):
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: PositiveInt | list[NonNegativeInt] | Literal["auto"] = 1
    num_nodes: PositiveInt = 1
    strategy: str = "auto"
    # auto: bf16 autocast on a CPU with bfloat16 hardware (AVX512-BF16 / AMX), else fp32; fp32 on GPUs.
    precision: Literal[PRECISIONS] = "auto"
    accumulate_grad_batches: PositiveInt = 1
    sync_batchnorm: bool = True
    channels_last: bool = False
    compile: bool | str = False                    # true (inductor) or a torch.compile backend name
    deterministic: bool = False
    log_every_n_steps: PositiveInt = 10
    limit_train_batches: PositiveInt | Annotated[float, Field(gt=0, le=1)] = 1.0
    limit_test_batches: PositiveInt | Annotated[float, Field(gt=0, le=1)] = 1.0
    # "auto": a progress bar on a terminal, one line per epoch otherwise (a log file); "bar";
    # "epochs"; "none" (callbacks/progress.py).
    progress: Literal["auto", "bar", "epochs", "none"] = "auto"


class LoggerConfig(Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "ciss"


class FiguresConfig(Section):
    qualitative_images: NonNegativeInt = 4         # test images of the qualitative figure; 0: none
    draw: bool = True                              # false: no PNG figures (results and tables still written)


class CheckpointConfig(Section):
    every_n_epochs: PositiveInt = 1
    # The model a step hands on: "last" (the last epoch's, every method's default) or
    # "best_validation": the epoch with the best mIoU of the step's own classes (background too at
    # step 0; MBS's rule) on the held-out training images (data.validation_fraction), scored every
    # validate_every_n_epochs epochs. Never the test set (MBS's code selects on VOC val, its test set).
    select: Literal["last", "best_validation"] = "last"
    validate_every_n_epochs: PositiveInt = 1

    def identity(self) -> dict:
        """The settings that shape the result; with select "last" what it was before selection
        existed, so earlier runs and cached step-0 models keep their ids."""
        values = self.model_dump()
        if self.select == "last":
            values.pop("select")
            values.pop("validate_every_n_epochs")
        return values


class RunConfig(Section):
    """What one method's run of an experiment uses: the experiment's sections with the method's
    own settings merged in, the method's hyper-parameters, and the precision resolved for this
    machine."""
    experiment: str
    method: str
    hparams: dict[str, Any]
    data: DataConfig
    network: NetworkConfig
    schedule: ScheduleConfig
    optimizer: OptimizerConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    figures: FiguresConfig
    checkpoint: CheckpointConfig
    seed: NonNegativeInt
    resume: bool
    output_dir: str
    cache_dir: str

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


class Experiment(Section):
    name: str
    description: str = ""
    based_on: str | None = None
    data: DataConfig
    network: NetworkConfig = NetworkConfig()
    schedule: ScheduleConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    trainer: TrainerConfig = TrainerConfig()
    logger: LoggerConfig = LoggerConfig()
    figures: FiguresConfig = FiguresConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    seed: NonNegativeInt = 42
    resume: bool = True                            # a run started again continues; false starts a new one
    output_dir: str = "runs"
    cache_dir: str = "runs/.step0_cache"
    methods: Annotated[dict[str, dict[str, Any]], Field(min_length=1)]
    expected: dict[str, Any] = {}                  # the papers' numbers, free form (experiments/reporting/table.py reads it)

    @field_validator("methods", mode="before")
    @classmethod
    def _entries_are_mappings(cls, methods):
        if isinstance(methods, dict):
            return {name: ({} if entry is None else entry) for name, entry in methods.items()}
        return methods

    _run_configs: dict = PrivateAttr(default_factory=dict)

    def run_config(self, method_name: str) -> RunConfig:
        """The configuration of `method_name`'s run (see the module docstring for the merge order)."""
        if method_name not in self._run_configs:
            self._run_configs[method_name] = _run_config(self, method_name)
        return self._run_configs[method_name]

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# --- method entries ----------------------------------------------------------------------------
def split_method_entry(entry: dict) -> tuple[dict, dict]:
    """(hyper-parameters, section overrides) of a `methods.<name>` entry."""
    sections = {k: v for k, v in entry.items() if k in METHOD_SECTIONS}
    return {k: v for k, v in entry.items() if k not in METHOD_SECTIONS}, sections


def _method_class(name: str):
    from lightning_modules.methods import METHODS

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@functools.lru_cache(maxsize=None)
def _hparams_model(method_cls) -> type[BaseModel]:
    """A strict pydantic model of the method's dataclass fields (built once per method class)."""
    hints = typing.get_type_hints(method_cls, include_extras=True)
    fields = {}
    for f in dataclasses.fields(method_cls):
        default = (f.default if f.default is not dataclasses.MISSING else Field(default_factory=f.default_factory))
        fields[f.name] = (hints[f.name], default)
    return create_model(f"{method_cls.__name__}Hyperparameters", __config__=ConfigDict(extra="forbid", strict=True),
                        **fields)


def validate_hparams(method_cls, hparams: dict, where: str) -> dict:
    """The method's hyper-parameters checked against its dataclass fields (names, types, ranges),
    with the defaults filled in."""
    model = _hparams_model(method_cls)
    try:
        return model(**hparams).model_dump()
    except ValidationError as error:
        raise _one_line(error, model, where, f"method {method_cls.name!r} hyper-parameter") from None


def _run_config(experiment: Experiment, method_name: str) -> RunConfig:
    method_cls = _method_class(method_name)
    hparams, sections = split_method_entry(experiment.methods.get(method_name) or {})  # unlisted: its defaults
    where = f"methods.{method_name}"
    hparams = validate_hparams(method_cls, hparams, where)
    for section, overrides in sections.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}.{section} must be a mapping of {section} settings, not {overrides!r}")
    trainer_keys = set((sections.get("trainer") or {})) - set(METHOD_TRAINER_KEYS)
    if trainer_keys:
        raise ConfigError(f"{where}.trainer.{sorted(trainer_keys)[0]}: a method may set only trainer."
                          f"{', trainer.'.join(METHOD_TRAINER_KEYS)}; the process layout is the experiment's")
    merged = {section: getattr(experiment, section).model_dump() for section in METHOD_SECTIONS}
    class_settings = copy.deepcopy(getattr(method_cls, "settings", {}) or {})
    class_batch = (class_settings.get("data") or {}).get("batch_size")
    if class_batch and "reference_batch" not in (class_settings.get("optimizer") or {}):
        class_settings.setdefault("optimizer", {})["reference_batch"] = class_batch  # its lr is for its batch
    merged = _merge(_merge(merged, class_settings), sections)
    merged["trainer"]["precision"] = resolve_precision(merged["trainer"]["precision"], merged["trainer"]["accelerator"])
    raw = dict(merged, experiment=experiment.name, method=method_name, hparams=hparams,
               **{k: getattr(experiment, k).model_dump() for k in ("logger", "figures", "checkpoint")},
               **{k: getattr(experiment, k) for k in ("seed", "resume", "output_dir", "cache_dir")})
    try:
        config = RunConfig(**raw)
    except ValidationError as error:
        raise _one_line(error, RunConfig, where) from None
    if config.checkpoint.select == "best_validation" and config.data.validation_fraction == 0:
        raise ConfigError("checkpoint.select=best_validation selects on held-out training images: set "
                          "data.validation_fraction (e.g. 0.1) too; the test set never selects")
    _check_fewshot(config.data)
    return config


def _check_fewshot(data) -> None:
    """What the few-shot steps cannot do, in one line at load rather than mid-run."""
    if data.fewshot is None:
        return
    if data.validation_fraction:
        raise ConfigError("data.fewshot: a few-shot step has no images to hold out; set data.validation_fraction=0")
    if data.fewshot.class_lists == "official" and data.dataset not in ("voc", "coco"):
        raise ConfigError(f"data.fewshot.class_lists=official: the official lists are VOC's and COCO's; "
                          f"{data.dataset} draws from its own lists (file_order)")


# --- precision ---------------------------------------------------------------------------------
def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX, ARM BF16), read from
    /proc/cpuinfo. Elsewhere (macOS, other systems) False: bf16 autocast without the hardware is
    slower than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def on_gpu(accelerator: str) -> bool:
    """Whether a trainer with this accelerator setting runs on a GPU here."""
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator == "auto":
        import torch

        return torch.cuda.is_available()
    return False


def resolve_precision(precision: str, accelerator: str) -> str:
    """The precision a run trains with on this machine. "auto": bf16 autocast on a CPU with bfloat16
    hardware (`make bench` here, with channels_last: a MiB step-1 iteration of the default
    experiment 85 ms instead of 110 ms in fp32), fp32 elsewhere and on GPUs. "16-mixed" (the GPU files of WILSON) is a GPU setting:
    on a CPU, where fp16 autocast does not exist, it becomes bf16-mixed or fp32 the same way."""
    if precision not in ("auto", "16-mixed") or (precision == "16-mixed" and on_gpu(accelerator)):
        return precision
    if on_gpu(accelerator):
        return "32-true"
    return "bf16-mixed" if cpu_has_bfloat16() else "32-true"


# --- errors ------------------------------------------------------------------------------------
def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the schema allows at `loc` (for "unknown key" messages)."""
    node = model
    for key in loc:
        field = getattr(node, "model_fields", {}).get(key)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *typing.get_args(annotation)]
        node = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if node is None:
            return []
    return sorted(getattr(node, "model_fields", {}))


def _one_line(error: ValidationError, model: type[BaseModel], prefix: str = "", what: str = "config key") -> ConfigError:
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    path = ".".join(loc)
    full = f"{prefix}.{path}" if prefix and path else (prefix or path)
    if first["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        return ConfigError(f"unknown {what} {full!r}" + (f"; known keys there: {', '.join(known)}" if known else ""))
    if first["type"] == "missing":
        return ConfigError(f"{full}: missing (it has no default; set it in the experiment file or as {full}=...)")
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) else ""
    return ConfigError(f"{full}: {first['msg'][0].lower()}{first['msg'][1:]}{shown}")


# --- files and overrides -------------------------------------------------------------------------
def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def _merge(base: dict, changes: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path.name}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path.name}: an experiment file is a YAML mapping")
    return config


def load_experiment(name: str) -> dict:
    """The experiment file `name` (or a path to a .yaml) as a raw dict, checked. A file may start
    from another with `base: <name>` (one level: the base may not have a base of its own) and change
    only what differs; expected numbers belong to one setting and are never inherited."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(experiment_names())}")
    config = _read_yaml(path)
    if "base" in config:
        base = load_experiment(config.pop("base"))
        if base.pop("based_on", None):
            raise ConfigError(f"{path.name}: its base has a base itself; keep experiment files one level deep")
        base.pop("expected", None)
        config = _merge(base, config)
        config["based_on"] = base["name"]
    config["name"] = path.stem
    _fix_reference_batches(config)
    validate(config, where=path.name)
    return config


def _fix_reference_batches(config: dict) -> None:
    """optimizer.reference_batch = the file's batch size, for the experiment and for every method
    entry that sets its own batch, unless the file says otherwise (see the module docstring)."""
    batch = (config.get("data") or {}).get("batch_size")
    optimizer = config.setdefault("optimizer", {}) if isinstance(config.get("optimizer", {}), dict) else None
    if optimizer is not None and optimizer.get("reference_batch") is None and batch is not None:
        optimizer["reference_batch"] = batch
    for entry in (config.get("methods") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("data"), dict) and "batch_size" in entry["data"]:
            entry_optimizer = entry.setdefault("optimizer", {})
            if isinstance(entry_optimizer, dict):
                entry_optimizer.setdefault("reference_batch", entry["data"]["batch_size"])


def validate(config: dict, where: str = "") -> Experiment:
    """The typed experiment, with every method's run configuration resolved (so that a bad method
    entry fails here too)."""
    try:
        experiment = Experiment(**config)
        for name in experiment.methods:
            experiment.run_config(name)
    except ValidationError as error:
        raised = _one_line(error, Experiment)
        raise ConfigError(f"{where}: {raised}" if where else str(raised)) from None
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}" if where else str(error)) from None
    return experiment


def _parse_value(key: str, raw: str):
    """YAML, except that numbers like 1e-3 (a string to YAML 1.1) are numbers."""
    if not raw.strip():
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"override {key}={raw}: the value is not valid YAML ({problem})") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _set(config: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = config
    for depth, key in enumerate(keys[:-1]):
        if key not in node or node[key] is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ConfigError(f"override {dotted}=...: {'.'.join(keys[:depth + 1])} is a value, not a section")
        node = node[key]
    node[keys[-1]] = value


def apply_overrides(config: dict | Experiment, overrides: list[str]) -> dict | Experiment:
    """A copy of `config` with `key=value` overrides (values parsed as YAML), validated (an unknown
    key, a wrong type, a value out of range: a ConfigError naming it); an Experiment in, an
    Experiment out, a raw dict in, a raw dict out. `methods=[a,b]` selects methods of the file (a
    registered method not in the file runs with its defaults)."""
    typed = isinstance(config, Experiment)
    raw = config.to_dict() if typed else copy.deepcopy(config)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key, text = override.split("=", 1)
        key = key.strip().lstrip("-")  # accept --key=value as wandb's ${args} passes it
        value = _parse_value(key, text)
        if key == "methods" and isinstance(value, (list, str)):
            value = [value] if isinstance(value, str) else value
            available = raw.get("methods") or {}
            raw["methods"] = {str(m): copy.deepcopy(available.get(m) or {}) for m in value}
            continue
        _set(raw, key, value)
    experiment = validate(raw)
    return experiment if typed else raw


def resolve(config: dict | Experiment) -> Experiment:
    """The validated experiment, with what depends on the environment filled in (the data root:
    data.root, else $DATA_ROOT, else ./data), so the saved config is complete."""
    raw = config.to_dict() if isinstance(config, Experiment) else copy.deepcopy(config)
    data = raw.setdefault("data", {})
    if isinstance(data, dict) and not data.get("root"):
        data["root"] = os.environ.get("DATA_ROOT", "data")
    if not raw.get("methods"):
        raise ConfigError("the experiment lists no methods")
    return validate(raw)
