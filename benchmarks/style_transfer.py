"""Gatys et al. style transfer against the PyTorch neural-style tutorial's algorithm, and fast style inference.

Peer: pytorch/tutorials advanced_source/neural_style_tutorial.py (commit 0a7e686): loss modules inserted after
the chosen convolutions of a copy of VGG19's `features` (its in-place ReLUs made out-of-place), the content
features and style Grams computed once while building it, the copy cut after the last loss module, then
`optim.LBFGS` (defaults: lr 1, max_iter 20, history 100) whose closure clamps the image to [0, 1] first. Written
again here from reading it, with one change in its favour: the VGG weights are frozen (`requires_grad_(False)`; the
tutorial leaves them trainable, so its backward also computes weight gradients).

Ours: `task=style_transfer`'s module with conf/model/gatys.yaml's settings (GatysStyleTransfer under a Lightning
Trainer, LBFGS with max_iter 1, one training step per evaluation; `model.vgg.dtype=auto`: the VGG in bfloat16
autocast where the device has native bf16 kernels, --dtype to change it). Both get the same content and style
(the task's scikit-image defaults at --size), the same random-weight VGG19, the same layers (on the conv outputs,
where the tutorial puts its losses) and weights (content 1, style 1e6, each style layer 1) and the same number
of loss evaluations; neither logs. Timed: the whole optimisation, targets included; the two take turns
(--repeats), medians; also the median time from one evaluation to the next, which load bursts move less.

Time to quality (float32 on both sides, the tutorial's layers and weights, so both minimise one loss): for each
content/style pair (--pairs: scikit-image samples sharing an aspect ratio, as the tutorial needs content and style
of one size; chelsea/coffee, astronaut/immunohistochemistry, rocket/chelsea at --size), the tutorial's algorithm
runs 300 evaluations; its time is from its start (targets included) to when the loss of its lowest evaluation
(its best, not its last), L, is known. Ours: `model.vgg.dtype=float32`, `model.scales` = --scales (coarse to fine;
default 0.5, 1), --quality-evaluations training steps (`data.iterations`, 200) split between the scales by
`model.scale_shares` = --scale-shares (default 3, 7), LBFGS lr 1, history 100, max_iter 1, its gradient projected
at the [0, 1] box as the module always does; timed from building the module through the Trainer's start, every
scale's targets and steps, to the end of the first full-size step whose image (as its evaluation saw it: each side's
image is credited when its evaluation's loss is known) scores <= L by the tutorial's loss function in float32. The
images are copied during the run and scored after it, untimed. A pair where ours never gets there is marked NOT
reached, its ratio over our whole run. Also printed per pair: each side's median time per evaluation and the ratio
at those times, which other load on the machine moves less. LBFGS at lr 1 without a line search, with the clamp,
is chaotic: when a run reaches which loss depends on the pair and on the schedule (and on any change in rounding)
more than on the time per evaluation. This part takes 6 to 7 minutes at 256 px on a 2-core CPU.

Prints the peer, the settings, the times, the first and last losses each side saw and each side's final image's
loss measured by one yardstick (the tutorial's loss function in float32), one line per time-to-quality pair, then
`ratio: gatys_vs_pytorch_tutorial_<layers> = tutorial time / ours` for the tutorial's layers and Gatys',
`ratio: gatys_time_to_quality_vs_pytorch_tutorial = the median over the pairs of tutorial time / ours` and
`ratio: fast_style_batched = one-at-a-time time / batched time` (Johnson et al.'s TransformerNet at --size,
per image) and `ratio: adain_vs_gatys_per_image = one Gatys image's time / AdaIN's time per image` (task=adain_style's
network stylising --images contents one at a time against one task=style_transfer image, its defaults, at --size).

    python benchmarks/style_transfer.py [--size 256] [--evaluations 40] [--repeats 1] [--dtype auto] [--threads 2]
        [--pairs chelsea/coffee ...] [--scales 0.5 1] [--scale-shares 3 7] [--quality-evaluations 200]
        [--skip gatys time_to_quality ...]
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import logging
import math
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate
from torch import nn

from framework.allocator import keep_freed_memory
from framework.config import compose, model_settings
from framework.images import IMAGENET_MEAN, IMAGENET_STD
from lightning_modules.style.adain import AdaINStyle
from lightning_modules.style.gatys import GatysStyleTransfer
from lightning_modules.style.nets import TransformerNet
from lightning_modules.style.vgg import DTYPES, VGGFeatures, layer_names

PEER = "pytorch/tutorials advanced_source/neural_style_tutorial.py @ 0a7e68666de5faceafa90276ad2b7874cd32c5e0"
# (content layers, style layers) in our names; the tutorial counts convolutions: conv_4 is conv2_2.
LAYERS = {
    "tutorial_layers": (["conv2_2"], ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1"]),
    "gatys_layers": (["conv4_2"], ["conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"]),
}
STYLE_WEIGHT = 1e6
# Time to quality: the tutorial's evaluations, and content/style pairs of scikit-image samples. The tutorial needs
# content and style of one size (its loss modules see both), so each pair shares an aspect ratio (2:3 or square).
TUTORIAL_EVALUATIONS = 300
PAIRS = ("chelsea/coffee", "astronaut/immunohistochemistry", "rocket/chelsea")
PARTS = ("gatys", "time_to_quality", "fast_style", "adain")


def task_data(size: int, iterations: int = 1, overrides: tuple[str, ...] = ()):
    """`task=style_transfer`'s data module (conf/data/style_images.yaml: the scikit-image content and style, or
    `overrides`' data.content and data.style) with the content's longer side `size` and `iterations` training
    steps."""
    cfg = compose(["task=style_transfer", f"data.image_size={size}", f"data.iterations={iterations}", *overrides])
    return instantiate(cfg.data)


def vgg_settings(dtype: str) -> dict:
    """conf/model/gatys.yaml's VGG block: VGG19, random weights (seed 0, drawn alike by both sides), `dtype`."""
    settings = model_settings("gatys", output="/dev/null")["vgg"]
    return {**settings, "arch": "vgg19", "pretrained": False, "dtype": dtype}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(steps: dict, iterations: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each step, after two warm-up calls; the steps take turns, so that a change
    in the machine's load (other processes) falls on all of them alike."""
    times = {name: [] for name in steps}
    for round_ in range(iterations + 2):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def per_evaluation(starts: list[float]) -> float:
    """The median time from one evaluation's start to the next's (the optimiser's own work included)."""
    return statistics.median(b - a for a, b in zip(starts, starts[1:]))


@dataclasses.dataclass
class Run:
    """One optimisation: each evaluation's loss as the run computed it, perf_counter when the run started (before its
    targets) and when each evaluation started and ended (its loss known), the final image; ours also keeps each
    evaluation's image size and a copy of the image each full-size evaluation saw (by evaluation index)."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    losses: list[float] = dataclasses.field(default_factory=list)
    starts: list[float] = dataclasses.field(default_factory=list)
    ends: list[float] = dataclasses.field(default_factory=list)
    sizes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    images: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    image: torch.Tensor | None = None


# The tutorial's algorithm.
def tutorial_gram(features: torch.Tensor) -> torch.Tensor:
    a, b, c, d = features.shape
    flat = features.view(a * b, c * d)
    return flat @ flat.t() / (a * b * c * d)


class ContentLoss(nn.Module):
    """Passes its input through and keeps its distance to the content features as `.loss`."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loss = F.mse_loss(x, self.target)
        return x


class StyleLoss(nn.Module):
    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = tutorial_gram(target).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loss = F.mse_loss(tutorial_gram(x), self.target)
        return x


class Normalization(nn.Module):
    def __init__(self, device: torch.device):
        super().__init__()
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(-1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(-1, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


def tutorial_model(cnn: nn.Sequential, content, style, content_layers, style_layers):
    """The tutorial's get_style_model_and_losses (layer names ours: conv1_1, relu1_1, pool1, ...)."""
    cnn = copy.deepcopy(cnn)
    model, content_losses, style_losses = nn.Sequential(Normalization(content.device)), [], []
    for name, layer in zip(layer_names("vgg19"), cnn.children()):
        model.add_module(name, nn.ReLU(inplace=False) if isinstance(layer, nn.ReLU) else layer)
        if name in content_layers:
            content_losses.append(ContentLoss(model(content).detach()))
            model.add_module(f"content_loss_{name}", content_losses[-1])
        if name in style_layers:
            style_losses.append(StyleLoss(model(style).detach()))
            model.add_module(f"style_loss_{name}", style_losses[-1])
    last = max(i for i, module in enumerate(model) if isinstance(module, (ContentLoss, StyleLoss)))
    return model[: last + 1], style_losses, content_losses


def run_tutorial(cnn, content, style, layers, evaluations: int) -> Run:
    """The tutorial's run_style_transfer, stopped after `evaluations` closure calls."""
    run = Run()
    model, style_losses, content_losses = tutorial_model(cnn, content, style, *layers)
    image = content.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([image])
    while len(run.losses) < evaluations:

        def closure():
            run.starts.append(time.perf_counter())
            image.data.clamp_(0, 1)
            optimizer.zero_grad()
            model(image)
            loss = STYLE_WEIGHT * sum(s.loss for s in style_losses) + sum(c.loss for c in content_losses)
            loss.backward()
            run.losses.append(loss.item())
            run.ends.append(time.perf_counter())
            return loss

        optimizer.step(closure)
    run.image = image.detach().clamp(0, 1)
    return run


@torch.no_grad()
def reference_losses(cnn, content, style, layers, images):
    """The tutorial's loss of each of `images` (an iterable, scored as it is consumed), in float32: one yardstick
    for both sides' images."""
    model, style_losses, content_losses = tutorial_model(cnn, content, style, *layers)
    for image in images:
        model(image)
        yield float(STYLE_WEIGHT * sum(s.loss for s in style_losses) + sum(c.loss for c in content_losses))


def tutorial_vgg(layers, device: torch.device) -> nn.Sequential:
    """torchvision's VGG19 `features` for the tutorial, frozen (see the docstring), with the random weights ours
    draws."""
    cnn = torchvision.models.vgg19().features.to(device).eval().requires_grad_(False)
    ours_vgg = VGGFeatures([*layers[0], *layers[1]], allow_random_features=False, **vgg_settings("float32"))
    cnn[: len(ours_vgg.body)].load_state_dict(ours_vgg.body.state_dict())
    return cnn


# Ours.
class Record(L.Callback):
    """Fills `run` with each training step (one evaluation): its start, image size, loss and end, and a copy of
    each full-size (`size`) image as its evaluation saw it (clamped by the step): cheap, scored after the run."""

    def __init__(self, run: Run, size: tuple[int, int]):
        self.run, self.size = run, size

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.run.starts.append(time.perf_counter())

    def on_before_backward(self, trainer, pl_module, loss):
        image = pl_module.result()
        self.run.sizes.append(tuple(image.shape[-2:]))
        if self.run.sizes[-1] == self.size:
            self.run.images[len(self.run.sizes) - 1] = image.clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.run.losses.append(float(outputs["loss"]))
        self.run.ends.append(time.perf_counter())


def run_ours(
    inputs: dict, layers, evaluations: int, dtype: str, device: torch.device, scales=(1.0,), shares=None
) -> Run:
    """GatysStyleTransfer with `model.scales=scales`, the steps split by `shares` (None: evenly), timed from
    building the module (its VGG) through the Trainer's start, each scale's targets and every step."""
    content_layers, style_layers = layers
    settings = model_settings(
        "gatys",
        vgg=vgg_settings(dtype),
        optimizer={"_target_": "torch.optim.LBFGS", "_partial_": True, "lr": 1.0, "max_iter": 1, "history_size": 100},
        content_layers=content_layers,
        style_layers=dict.fromkeys(style_layers, 1.0),
        style_weight=STYLE_WEIGHT,
        scales=list(scales),
        scale_shares=shares,
        output="/dev/null",
    )
    steps = task_data(1, evaluations).train_dataloader()  # the steps: no images read
    run = Run()
    model = GatysStyleTransfer(**inputs, **settings)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record(run, tuple(inputs["content"].shape[-2:]))],
    )
    trainer.fit(model, train_dataloaders=steps)
    run.image = model.result()[None]
    return run


def gatys(inputs: dict, name: str, args: argparse.Namespace, device: torch.device) -> float:
    layers = LAYERS[name]
    content, style = inputs["content"][None].to(device), inputs["styles"][0][None].to(device)
    cnn = tutorial_vgg(layers, device)
    runs = {
        "pytorch_tutorial": lambda n: run_tutorial(cnn, content, style, layers, n),
        "ours": lambda n: run_ours(inputs, layers, n, args.dtype, device),
    }
    for run in runs.values():
        run(2)  # warm-up: oneDNN's kernels, Lightning's first Trainer
    times, results = {k: [] for k in runs}, {}
    for _ in range(args.repeats):
        for key, run in runs.items():
            sync(device)
            start = time.perf_counter()
            results[key] = run(args.evaluations)
            sync(device)
            times[key].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    # From one evaluation's start to the next's (the optimiser's own work included), the median of the last run:
    # a check on the whole-run times that a burst of load on a shared machine moves less.
    each = {k: per_evaluation(r.starts) for k, r in results.items()}
    first, final = results["pytorch_tutorial"].losses, results["ours"].losses
    assert len(first) == len(final) == args.evaluations, (len(first), len(final))
    # The same loss function: the first evaluation (the content image) agrees to float32 rounding, or bfloat16's.
    tolerance = 2e-2 if args.bf16 else 1e-4
    assert abs(final[0] - first[0]) <= tolerance * abs(first[0]), (final[0], first[0])
    # Each side's final image, measured in float32 by the tutorial's loss: LBFGS trajectories part under any change
    # in rounding, so the losses the runs saw last compare less well than the images they reached.
    ends = dict(zip(results, reference_losses(cnn, content, style, layers, (r.image for r in results.values()))))
    print(
        f"gatys {name} (content {', '.join(layers[0])}; style {', '.join(layers[1])}), {args.evaluations} "
        f"evaluations: tutorial {median['pytorch_tutorial']:.2f} s, ours {median['ours']:.2f} s "
        f"(runs: {', '.join(f'{t:.2f}' for t in times['pytorch_tutorial'])} | "
        f"{', '.join(f'{t:.2f}' for t in times['ours'])}); per evaluation (median): tutorial "
        f"{each['pytorch_tutorial']:.3f} s, ours {each['ours']:.3f} s "
        f"({each['pytorch_tutorial'] / each['ours']:.2f}x); "
        f"loss at the start: tutorial {first[0]:.6g}, "
        f"ours {final[0]:.6g}; last evaluated: tutorial {first[-1]:.6g}, ours {final[-1]:.6g}"
    )
    print(
        f"  final image's loss (float32, the tutorial's loss function): tutorial {ends['pytorch_tutorial']:.6g}, "
        f"ours {ends['ours']:.6g} ({ends['ours'] / ends['pytorch_tutorial'] - 1:+.2%})"
    )
    return median["pytorch_tutorial"] / median["ours"]


def time_to_quality(pair: str, args: argparse.Namespace, device: torch.device) -> tuple[float, bool]:
    """The tutorial's time to its lowest loss in TUTORIAL_EVALUATIONS over ours (float32) to the first full-size
    image as low by the tutorial's loss, for one content/style pair ("content/style" sample names); and whether ours
    got there (if not, the ratio is over our whole run)."""
    content_name, style_name = pair.split("/")
    overrides = (f"data.content=skimage:{content_name}", f"data.style=skimage:{style_name}")
    inputs = task_data(args.size, overrides=overrides).model_inputs(GatysStyleTransfer.data_inputs)
    layers = LAYERS["tutorial_layers"]
    content, style = inputs["content"][None].to(device), inputs["styles"][0][None].to(device)
    cnn = tutorial_vgg(layers, device)
    run_tutorial(cnn, content, style, layers, 2)  # warm-up at this pair's sizes (ours: one step at each scale)
    run_ours(inputs, layers, len(args.scales), "float32", device, args.scales, args.scale_shares)
    tutorial = run_tutorial(cnn, content, style, layers, TUTORIAL_EVALUATIONS)
    best = min(range(TUTORIAL_EVALUATIONS), key=tutorial.losses.__getitem__)
    target, tutorial_time = tutorial.losses[best], tutorial.ends[best] - tutorial.start
    ours = run_ours(inputs, layers, args.quality_evaluations, "float32", device, args.scales, args.scale_shares)
    scores = reference_losses(cnn, content, style, layers, (image[None] for image in ours.images.values()))
    reached, lowest = None, math.inf
    for step, loss in zip(ours.images, scores):  # scored in order, up to the first as low as the tutorial's best
        lowest = min(lowest, loss)
        if loss <= target:
            reached = step
            break
    last = len(ours.sizes) - 1 if reached is None else reached
    ours_time = ours.ends[last] - ours.start
    counts = collections.Counter(ours.sizes)  # evaluations at each scale, coarse to fine
    print(
        f"time to quality, content {content_name}, style {style_name} ({content.shape[-1]}x{content.shape[-2]} px): "
        f"tutorial's lowest loss {target:.6g} at evaluation {best + 1} of {TUTORIAL_EVALUATIONS}, "
        f"{tutorial_time:.2f} s; ours (scales {' + '.join(f'{s:g}' for s in args.scales)}: "
        f"{' + '.join(map(str, counts.values()))} evaluations) "
        + (
            f"reached {lowest:.6g} at full-size evaluation {reached - min(ours.images) + 1} (evaluation "
            f"{reached + 1}), {ours_time:.2f} s -> {tutorial_time / ours_time:.2f}"
            if reached is not None
            else f"did NOT reach it in {len(ours.sizes)} evaluations (lowest {lowest:.6g}): its whole run "
            f"{ours_time:.2f} s -> {tutorial_time / ours_time:.2f} (tutorial time / our whole run)"
        )
    )
    # Load on a shared machine stretches some evaluations: the same ratio at each side's median evaluation times.
    each = {size: per_evaluation([t for t, s in zip(ours.starts, ours.sizes) if s == size]) for size in counts}
    tutorial_each = per_evaluation(tutorial.starts)
    print(
        f"  per evaluation (median): tutorial {tutorial_each:.3f} s, ours "
        f"{', '.join(f'{s:g}: {t:.3f}' for s, t in zip(args.scales, each.values()))} s; the ratio at these times: "
        f"{(best + 1) * tutorial_each / sum(each[size] for size in ours.sizes[: last + 1]):.2f}"
    )
    return tutorial_time / ours_time, reached is not None


def adain_vs_gatys(size: int, images: int, device: torch.device) -> float:
    """One Gatys image (task=style_transfer's defaults: Gatys' layers, data.iterations evaluations, model.vgg.dtype
    auto) over AdaIN's stylising time per image (conf/model/adain.yaml: the VGG19 encoder and the decoder, random
    weights, float32; `images` contents with one style, one at a time, after a warm-up), both at `size` px."""
    torch.manual_seed(0)
    adain = AdaINStyle(**model_settings("adain", vgg=vgg_settings("float32"))).to(device).eval()
    contents, style = torch.rand(images, 3, size, size, device=device), torch.rand(3, size, size, device=device)
    per_image = timed({"adain": lambda: [adain.stylise(c[None], [style]) for c in contents]}, 3, device)["adain"]
    per_image /= images
    inputs = task_data(size).model_inputs(GatysStyleTransfer.data_inputs)
    evaluations = compose(["task=style_transfer"]).data.iterations
    dtype = model_settings("gatys", output="/dev/null")["vgg"]["dtype"]
    sync(device)
    start = time.perf_counter()
    run_ours(inputs, LAYERS["gatys_layers"], evaluations, dtype, device)
    sync(device)
    gatys_time = time.perf_counter() - start
    print(
        f"AdaIN vs Gatys at {size} px: AdaIN {per_image:.3f} s per image (VGG19 to relu4_1 + decoder, float32); "
        f"one Gatys image {gatys_time:.1f} s ({evaluations} LBFGS evaluations, Gatys' layers, dtype {dtype})"
    )
    return gatys_time / per_image


@torch.inference_mode()
def fast_style(size: int, images: int, batch: int, device: torch.device) -> float:
    torch.manual_seed(0)
    net = TransformerNet(**model_settings("fast_style")["net"]).to(device).eval()  # conf/model/fast_style.yaml's
    pictures = torch.rand(images, 3, size, size, device=device)
    results = timed(
        {
            "one": lambda: [net(p[None]) for p in pictures],
            "batched": lambda: [net(pictures[i : i + batch]) for i in range(0, images, batch)],
        },
        3,
        device,
    )
    one, batched = results["one"] / images, results["batched"] / images
    print(
        f"fast style inference at {size} px: one at a time {1 / one:.1f} images/s, "
        f"batches of {batch} {1 / batched:.1f} images/s"
    )
    return one / batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="longer side of the content, px")
    parser.add_argument("--evaluations", type=int, default=40, help="Gatys: loss evaluations per run")
    parser.add_argument("--repeats", type=int, default=1, help="Gatys: timed runs of each (medians)")
    parser.add_argument(
        "--dtype",
        default=model_settings("gatys", output="/dev/null")["vgg"]["dtype"],
        choices=DTYPES,
        help="ours: model.vgg.dtype (default: conf/model/gatys.yaml's)",
    )
    parser.add_argument(
        "--pairs", nargs="+", default=PAIRS, help="time to quality: content/style, scikit-image samples of one aspect"
    )
    parser.add_argument("--scales", nargs="+", type=float, default=[0.5, 1.0], help="time to quality: model.scales")
    parser.add_argument(
        "--scale-shares", nargs="+", type=float, default=[3.0, 7.0], help="time to quality: model.scale_shares"
    )
    parser.add_argument(
        "--quality-evaluations",
        type=int,
        default=200,
        help="time to quality: ours' evaluations (data.iterations), split over the scales by --scale-shares",
    )
    parser.add_argument("--images", type=int, default=8, help="fast style: images per timed pass")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts not to run")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as run.py does, for both: large temporaries stay in the heap instead of fresh mmaps
    logging.disable(logging.WARNING)  # the style image's resizing notice and Lightning's hints
    args.bf16 = VGGFeatures(["conv1_1"], allow_random_features=False, **vgg_settings(args.dtype)).bf16(device)
    print(f"peer: {PEER}")
    print(
        f"settings: {args.size} px content and style (skimage chelsea, coffee), random VGG19 (seed 0) frozen in both, "
        f"{args.evaluations} LBFGS evaluations (lr 1, history 100), content weight 1, style weight {STYLE_WEIGHT:g}; "
        f"the tutorial in float32, ours model.vgg.dtype={args.dtype} "
        f"({'bfloat16' if args.bf16 else 'float32'} "
        f"on {device.type}); {args.repeats} timed run(s) each after a warm-up"
    )
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    ratios = {}
    if "gatys" not in args.skip:
        inputs = task_data(args.size).model_inputs(GatysStyleTransfer.data_inputs)
        ratios.update({f"gatys_vs_pytorch_tutorial_{name}": gatys(inputs, name, args, device) for name in LAYERS})
    if "time_to_quality" not in args.skip:
        print(
            f"time to quality: the tutorial's layers, float32 on both sides; the tutorial {TUTORIAL_EVALUATIONS} "
            f"evaluations; ours model.scales={args.scales} with {args.quality_evaluations} evaluations split "
            f"{':'.join(f'{share:g}' for share in args.scale_shares)}; "
            "times from each run's start (targets included; ours: building the module, the Trainer's start, every "
            "scale) to when the loss of the image is known; our images scored after the run, untimed"
        )
        quality = [time_to_quality(pair, args, device) for pair in args.pairs]
        reached = sum(got for _, got in quality)
        print(f"time to quality: ours reached the tutorial's lowest loss on {reached} of {len(quality)} pairs")
        ratios["gatys_time_to_quality_vs_pytorch_tutorial"] = statistics.median(ratio for ratio, _ in quality)
    if "fast_style" not in args.skip:
        ratios["fast_style_batched"] = fast_style(args.size, args.images, args.batch, device)
    if "adain" not in args.skip:
        ratios["adain_vs_gatys_per_image"] = adain_vs_gatys(args.size, args.images, device)
    for name, ratio in ratios.items():
        print(f"ratio: {name} = {ratio:.2f}")


if __name__ == "__main__":
    main()
