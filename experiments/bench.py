"""Training throughput of the suite against a bare PyTorch loop: `make bench` (not a timed test).

`python -m experiments.bench [--experiment E] [--methods mib wilson] [--iterations 30] [--warmup 5]
[--preset embedded|r101-512] [--precision 32-true|bf16-mixed] [--channels-last] [key=value ...]`

For each method, one incremental step (step 1) is measured three ways, each in a fresh process
(so that peak memory is the variant's own):
  suite  the step as `make run` trains it: IncrementalSegmentationModule + TeacherCallback + the
         Trainer of experiments.run (checkpointing, progress bar, logging of every loss term)
  bare   the same network, old network, batch, losses, data loader, SGD and lr schedule in a
         plain `for batch in loader: loss.backward(); optimizer.step()` loop
  data   the data loader alone (images/s it can deliver: it must not be the bottleneck)
Throughput is images per second over `--iterations` iterations after `--warmup`; the ratio
suite / bare is the framework's cost (goal: >= 0.9). Peak memory: the process's peak resident
set on CPU, torch.cuda.max_memory_allocated on GPU.

`--data-path`: the data path at the paper scale instead, on this CPU, one core: decode + the train
transform (random resized crop to 512, flip, normalisation) of VOC-sized JPEGs (500x375, with their
PNG masks), and what one GPU training DeepLabV3-ResNet-101 at 512 would consume (the network's
training FLOPs per image, counted here, at an assumed share of an H100's bf16 peak): the loader
workers it needs.

Presets: "embedded" = the experiment as configured (the default: synthetic_15_5_disjoint, CPU);
"r101-512" = DeepLabV3-ResNet-101 at 512x512 crops with batch 12 (the paper network; on a GPU).
Every method is measured with its full step-1 loss from the first iteration (its
`full_loss_hparams`: WILSON's pseudo-labels from epoch 0).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PRESETS = {
    "embedded": [],
    "r101-512": ["network.encoder=resnet101", "network.encoder_depth=5", "network.output_stride=16",
                 "network.atrous_rates=[6, 12, 18]", "network.decoder_channels=256", "data.crop_size=512",
                 "data.batch_size=12", "data.options.synthetic={train: 240, val: 24, size: 560, seed: 0}",
                 "data.root=data/bench-512"],
}


def _config(args, method: str):
    """The run configuration of `method` in the benchmarked experiment, with the method's full loss
    from the first iteration (Method.full_loss_hparams: WILSON's pseudo-labels from epoch 0)."""
    from experiments.config import apply_overrides, load_experiment, resolve
    from lightning_modules.methods import METHODS

    overrides = [*PRESETS[args.preset], f"trainer.precision={args.precision}",
                 f"trainer.channels_last={str(args.channels_last).lower()}", "logger.wandb=disabled",
                 f"methods=[{method}]", "output_dir=runs/bench", "cache_dir=runs/bench/cache", "trainer.progress=none",
                 f"trainer.limit_train_batches={args.warmup + args.iterations}", *args.overrides]
    overrides += [f"methods.{method}.{key}={value}" for key, value in METHODS[method].full_loss_hparams.items()]
    return resolve(apply_overrides(load_experiment(args.experiment), overrides)).run_config(method)


def _step_one(config):
    """Step 1 as `make run` builds it (experiments.run.learn_task and experiments.training), from an
    untrained step-0 network (throughput does not depend on the weights)."""
    from datamodules import datasets
    from datamodules.tasks import task_classes
    from experiments.training import build_step
    from lightning_modules.methods import build_method

    data = config.data
    steps = task_classes(data.dataset, data.task)
    datasets.locate(data.dataset, data.root, data.options)
    method = build_method(config.method, **config.hparams)
    network = method.build_network(config.network, [len(steps[0])], pretrained=False)
    old_network = network.frozen_copy() if method.uses_old_model else None
    network.add_classes(len(steps[1]))
    method.init_new_classifier(network, old_network)
    return build_step(config, method, steps, 1, network, old_network)


class _Timer:
    """Wall time of iterations warmup .. warmup + iterations - 1 (synchronising the GPU)."""

    def __init__(self, warmup: int, iterations: int, device):
        self.warmup, self.iterations, self.device = warmup, iterations, device
        self.count, self.started, self.seconds = 0, None, None
        self.images = 0

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def batch_done(self, images: int) -> None:
        self.count += 1
        if self.count == self.warmup:
            self._sync()
            self.started = time.perf_counter()
        elif self.count > self.warmup:
            self.images += images
            if self.count == self.warmup + self.iterations:
                self._sync()
                self.seconds = time.perf_counter() - self.started


def _device(config):
    import torch

    accelerator = config.trainer.accelerator
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def _measure_suite(config, method_name, timer_args):
    import pytorch_lightning as pl

    from experiments.training import build_trainer

    built = _step_one(config)
    timer = _Timer(*timer_args, _device(config))

    class Timing(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.batch_done(len(batch["image"]))

    trainer = build_trainer(config, 1, False, built.callbacks + [Timing()])
    trainer.fit(built.module, datamodule=built.datamodule)
    return timer


def _measure_bare(config, method_name, timer_args):
    import torch

    built = _step_one(config)
    module, datamodule = built.module, built.datamodule
    device = _device(config)
    for callback in built.callbacks:  # the same hand-over of the old network as under the Trainer
        callback.setup(None, module, "fit")
    module.to(device)
    module.configure_model()
    if module.old_network is not None:
        module.old_network.to(device).eval()
    module.train()
    loader = datamodule.train_dataloader()
    total = min(len(loader), timer_args[0] + timer_args[1])
    optimizer, scheduler = module.build_optimizer(total, total)  # what configure_optimizers returns
    precision = config.trainer.precision
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    timer = _Timer(*timer_args, device)
    for index, batch in enumerate(loader):
        if index == total:
            break
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if module.channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = module.method.training_loss(module, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss.item()  # the suite reads the loss every iteration too (non-finite check, progress bar)
        timer.batch_done(len(batch["image"]))
    return timer


def _measure_data(config, method_name, timer_args):
    datamodule = _step_one(config).datamodule
    timer = _Timer(*timer_args, _device(config))
    for index, batch in enumerate(datamodule.train_dataloader()):
        timer.batch_done(len(batch["image"]))
        if timer.seconds is not None:
            break
    return timer


def _child(variant, args, method, queue):
    import torch

    from experiments.run import quiet_libraries

    quiet_libraries()
    torch.manual_seed(0)
    config = _config(args, method)
    measure = {"suite": _measure_suite, "bare": _measure_bare, "data": _measure_data}[variant]
    device = _device(config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = measure(config, method, (args.warmup, args.iterations))
    if timer.seconds is None:
        queue.put({"error": f"fewer than {args.warmup + args.iterations} batches in one epoch"})
        return
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    queue.put({"images_per_s": timer.images / timer.seconds, "ms_per_iteration": 1000 * timer.seconds / args.iterations,
               "peak_mb": peak, "device": str(device), "batch": config.data.batch_size,
               "crop": config.data.crop_size, "precision": config.trainer.precision})


def measure(variant: str, args, method: str) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(variant, args, method, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        return {"error": f"exit code {process.exitcode}"}
    return queue.get()


# --- the data path at the paper scale ------------------------------------------------------------
H100_BF16_DENSE_TFLOPS = 989.0   # NVIDIA's H100 SXM datasheet, dense bf16 tensor cores
ASSUMED_UTILISATION = (0.2, 0.35, 0.5)   # convolutional training reaches a fraction of the peak


def write_voc_sized_images(directory, count: int, seed: int = 0) -> list[tuple]:
    """`count` (JPEG, PNG mask) pairs of VOC's typical size (500 x 375) and file size (JPEG quality 95:
    about 115 kB, as VOC 2012's 17,125 JPEGs in its 1.9 GB archive): the embedded dataset's scenes
    drawn at 500 pixels and cut to 375 rows."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from datamodules.datasets import synthetic
    from datamodules.datasets.voc import save_mask

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    attributes, friends = synthetic.class_attributes(0), synthetic.class_friends(0)
    pairs = []
    for index in range(count):
        image, mask = synthetic.generate_sample(rng, 500, attributes, friends)
        jpeg, png = directory / f"{index:04d}.jpg", directory / f"{index:04d}.png"
        Image.fromarray(image[62:437]).save(jpeg, quality=95)
        save_mask(png, mask[62:437])
        pairs.append((jpeg, png))
    return pairs


def data_path_rates(pairs, crop: int = 512, rounds: int = 2) -> dict:
    """Images per second on one core (one thread in OpenCV and torch): decode alone (image + mask,
    as the datamodule reads them), and decode + the train transform (datamodules.transforms)."""
    import cv2
    import torch

    from datamodules.datasets.voc import load_image, load_mask
    from datamodules.transforms import train_transform

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    transform = train_transform(crop)
    rates = {}
    for name, work in (("decode", lambda i, m: (load_image(i), load_mask(m))),
                       ("decode_augment", lambda i, m: transform(image=load_image(i), mask=load_mask(m)))):
        work(*pairs[0])   # warm-up
        started = time.perf_counter()
        for _ in range(rounds):
            for image, mask in pairs:
                work(image, mask)
        rates[name] = rounds * len(pairs) / (time.perf_counter() - started)
    return rates


def training_flops_per_image(crop: int = 512) -> float:
    """Forward + backward FLOPs of DeepLabV3-ResNet-101 (output stride 16, the paper network) on one
    crop x crop image, counted by torch's FlopCounterMode on one forward (backward = 2 x forward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from experiments.config import NetworkConfig
    from lightning_modules.network import build_network

    network = build_network(NetworkConfig(encoder="resnet101", encoder_depth=5, output_stride=16,
                                          atrous_rates=[6, 12, 18], decoder_channels=256, encoder_weights=None),
                            [16], pretrained=False).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        network(torch.zeros(1, 3, crop, crop))
    return 3.0 * counter.get_total_flops()


def data_path_main(count: int, console) -> int:
    import math
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        pairs = write_voc_sized_images(directory, count)
        kilobytes = sum(jpeg.stat().st_size for jpeg, _ in pairs) / len(pairs) / 1024
        rates = data_path_rates(pairs)
    flops = training_flops_per_image()
    console.print(f"one core, {count} VOC-sized JPEGs (500x375, {kilobytes:.0f} kB each) + masks, 2 rounds: "
                  f"decode {rates['decode']:.0f} images/s; "
                  f"decode + train transform (crop 512) {rates['decode_augment']:.0f} images/s "
                  f"({1000 / rates['decode_augment']:.1f} ms per image)")
    console.print(f"DeepLabV3-R101 (OS 16) at 512: {flops / 1e9:.0f} GFLOP per training image (forward + backward, counted)")
    for share in ASSUMED_UTILISATION:
        need = share * H100_BF16_DENSE_TFLOPS * 1e12 / flops
        console.print(f"  an H100 at {share:.0%} of its bf16 peak trains {need:.0f} images/s: "
                      f"{math.ceil(need / rates['decode_augment'])} loader workers (cores) to feed it")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="synthetic_15_5_disjoint")
    parser.add_argument("--methods", nargs="+", default=["mib", "wilson"])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="embedded")
    parser.add_argument("--precision", default="32-true", choices=["auto", "32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--data-path", action="store_true",
                        help="measure the data path at the paper scale on this CPU instead (module docstring)")
    parser.add_argument("--data-images", type=int, default=100, help="VOC-sized images for --data-path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the experiment")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.data_path:
        return data_path_main(args.data_images, console)
    table = Table(title=f"training throughput, step 1 of {args.experiment} ({args.preset}, {args.precision}"
                        f"{', channels_last' if args.channels_last else ''}; {args.iterations} iterations after "
                        f"{args.warmup})")
    for column in ("method", "suite img/s", "bare img/s", "suite / bare", "data img/s", "suite ms/it",
                   "bare ms/it", "suite peak MB", "bare peak MB"):
        table.add_column(column, justify="right" if column != "method" else "left")
    measurements = {}
    for method in args.methods:
        measured = {variant: measure(variant, args, method) for variant in ("bare", "suite", "data")}
        measurements[method] = measured
        errors = [f"{v}: {m['error']}" for v, m in measured.items() if "error" in m]
        if errors:
            console.print(f"[red]{method}: {'; '.join(errors)}[/]")
            continue
        suite, bare, data = measured["suite"], measured["bare"], measured["data"]
        table.add_row(method, f"{suite['images_per_s']:.1f}", f"{bare['images_per_s']:.1f}",
                      f"{suite['images_per_s'] / bare['images_per_s']:.2f}", f"{data['images_per_s']:.0f}",
                      f"{suite['ms_per_iteration']:.0f}", f"{bare['ms_per_iteration']:.0f}",
                      f"{suite['peak_mb']:.0f}", f"{bare['peak_mb']:.0f}")
    console.print(table)
    first = next((m["suite"] for m in measurements.values() if "device" in m.get("suite", {})), {})
    console.print(f"device {first.get('device', '?')}, batch {first.get('batch', '?')}, crop {first.get('crop', '?')}, "
                  f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "measurements": measurements}, f, indent=1)
    return 0 if all("error" not in m for ms in measurements.values() for m in ms.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
