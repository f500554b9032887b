"""Gatys et al. style transfer against the PyTorch neural-style tutorial's algorithm, and fast style inference.

Peer: pytorch/tutorials advanced_source/neural_style_tutorial.py (commit 0a7e686): loss modules inserted after
the chosen convolutions of a copy of VGG19's `features` (its in-place ReLUs made out-of-place), the content
features and style Grams computed once while building it, the copy cut after the last loss module, then
`optim.LBFGS` (defaults: max_iter 20, history 100) whose closure clamps the image to [0, 1] first. Written again
here from reading it, with one change in its favour: the VGG weights are frozen (`requires_grad_(False)`; the
tutorial leaves them trainable, so its backward also computes weight gradients).

Ours: `task=style_transfer`'s module with conf/model/gatys.yaml's settings (GatysStyleTransfer under a Lightning
Trainer, LBFGS with max_iter 1, one training step per evaluation; `model.vgg.dtype=auto`: the VGG in bfloat16
autocast where the device has native bf16 kernels, --dtype to change it). Both get the same content and style
(the task's scikit-image defaults at --size), the same random-weight VGG19, the same layers (on the conv outputs,
where the tutorial puts its losses) and weights (content 1, style 1e6, each style layer 1) and the same number
of loss evaluations; neither logs. Timed: the whole optimisation, targets included; the two take turns
(--repeats), medians; also the median time from one evaluation to the next, which load bursts move less.

Prints the peer, the settings, the times, the first and last losses each side saw and each side's final image's
loss measured by one yardstick (the tutorial's loss function in float32), then
`ratio: gatys_vs_pytorch_tutorial_<layers> = tutorial time / ours` for the tutorial's layers and Gatys', and
`ratio: fast_style_batched = one-at-a-time time / batched time` (Johnson et al.'s TransformerNet at --size,
per image).

    python benchmarks/style_transfer.py [--size 256] [--evaluations 40] [--repeats 1] [--dtype auto] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import logging
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


def task_data(size: int, iterations: int = 1):
    """`task=style_transfer`'s data module (conf/data/style_images.yaml: the scikit-image content and style) with the
    content's longer side `size` and `iterations` training steps."""
    cfg = compose(["task=style_transfer", f"data.image_size={size}", f"data.iterations={iterations}"])
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


def run_tutorial(cnn, content, style, layers, evaluations: int) -> tuple[list[float], torch.Tensor, list[float]]:
    """The tutorial's run_style_transfer, stopped after `evaluations` closure calls: the losses, the final image and
    when each evaluation started."""
    model, style_losses, content_losses = tutorial_model(cnn, content, style, *layers)
    image = content.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([image])
    losses, starts = [], []
    while len(losses) < evaluations:

        def closure():
            starts.append(time.perf_counter())
            image.data.clamp_(0, 1)
            optimizer.zero_grad()
            model(image)
            loss = STYLE_WEIGHT * sum(s.loss for s in style_losses) + sum(c.loss for c in content_losses)
            loss.backward()
            losses.append(loss.item())
            return loss

        optimizer.step(closure)
    return losses, image.detach().clamp(0, 1), starts


@torch.no_grad()
def reference_loss(cnn, content, style, layers, image: torch.Tensor) -> float:
    """The tutorial's loss of `image`, in float32: one yardstick for both sides' final images."""
    model, style_losses, content_losses = tutorial_model(cnn, content, style, *layers)
    model(image)
    return float(STYLE_WEIGHT * sum(s.loss for s in style_losses) + sum(c.loss for c in content_losses))


# Ours.
class Losses(L.Callback):
    def __init__(self):
        self.values, self.starts = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def run_ours(
    inputs: dict, layers, evaluations: int, dtype: str, device: torch.device
) -> tuple[list[float], torch.Tensor, list[float]]:
    content_layers, style_layers = layers
    settings = model_settings(
        "gatys",
        vgg=vgg_settings(dtype),
        optimizer={"_target_": "torch.optim.LBFGS", "_partial_": True, "lr": 1.0, "max_iter": 1, "history_size": 100},
        content_layers=content_layers,
        style_layers=dict.fromkeys(style_layers, 1.0),
        style_weight=STYLE_WEIGHT,
        output="/dev/null",
    )
    model = GatysStyleTransfer(**inputs, **settings)
    losses = Losses()
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
    )
    trainer.fit(model, train_dataloaders=task_data(1, evaluations).train_dataloader())  # the steps: no images read
    return losses.values, model.result()[None], losses.starts


def gatys(inputs: dict, name: str, args: argparse.Namespace, device: torch.device) -> float:
    layers = LAYERS[name]
    content, style = inputs["content"][None].to(device), inputs["styles"][0][None].to(device)
    cnn = torchvision.models.vgg19().features.to(device).eval().requires_grad_(False)  # frozen: see the docstring
    # the weights ours will draw
    ours_vgg = VGGFeatures([*layers[0], *layers[1]], allow_random_features=False, **vgg_settings("float32"))
    cnn[: len(ours_vgg.body)].load_state_dict(ours_vgg.body.state_dict())
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
    each = {k: statistics.median(b - a for a, b in zip(r[2], r[2][1:])) for k, r in results.items()}
    first, final = results["pytorch_tutorial"][0], results["ours"][0]
    assert len(first) == len(final) == args.evaluations, (len(first), len(final))
    # The same loss function: the first evaluation (the content image) agrees to float32 rounding, or bfloat16's.
    tolerance = 2e-2 if args.bf16 else 1e-4
    assert abs(final[0] - first[0]) <= tolerance * abs(first[0]), (final[0], first[0])
    # Each side's final image, measured in float32 by the tutorial's loss: LBFGS trajectories part under any change
    # in rounding, so the losses the runs saw last compare less well than the images they reached.
    ends = {key: reference_loss(cnn, content, style, layers, result[1]) for key, result in results.items()}
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
    parser.add_argument("--images", type=int, default=8, help="fast style: images per timed pass")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
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
    inputs = task_data(args.size).model_inputs(GatysStyleTransfer.data_inputs)
    ratios = {name: gatys(inputs, name, args, device) for name in LAYERS}
    batched_ratio = fast_style(args.size, args.images, args.batch, device)
    for name, ratio in ratios.items():
        print(f"ratio: gatys_vs_pytorch_tutorial_{name} = {ratio:.2f}")
    print(f"ratio: fast_style_batched = {batched_ratio:.2f}")


if __name__ == "__main__":
    main()
