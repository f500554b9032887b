"""Gatys et al. iterations and fast style inference, ours against the straightforward way, in one process.

Gatys: one Adam iteration (loss, gradient, update) on a 256 px image with the default layers (content relu4_2,
style relu1_1..relu5_1), the same random-weight VGG19 for both:
- baseline, written the usual way: the whole VGG19 `features` (torchvision's layers, up to pool5) runs on the
  image every iteration, and the style image goes through it again every iteration to recompute its Grams
  (VGG weights frozen in both, so neither builds a graph for the style pass);
- ours: `PerceptualLoss` as GatysStyleTransfer uses it: VGG19 cut after relu5_1, style Grams computed once.
Both compute the same loss (checked); glibc keeps freed memory for both, as run.py sets it.
Then fast style inference (Johnson et al.'s TransformerNet, 256 px):
images/s one image at a time against batches.

Prints the times, then `ratio: gatys_iteration = baseline / ours` and
`ratio: fast_style_batched = one-at-a-time time / batched time` (per image).

    python benchmarks/style_transfer.py [--size 256] [--iterations 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

from framework.allocator import keep_freed_memory
from lightning_modules.style.losses import PerceptualLoss, gram_matrix
from lightning_modules.style.nets import TransformerNet
from lightning_modules.style.vgg import VGGFeatures, layer_names

CONTENT_LAYERS = ["relu4_2"]
STYLE_LAYERS = {name: 1.0 for name in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")}
STYLE_WEIGHT = 1e6


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


class BaselineGatys:
    """The usual loop: the full VGG19 on the image and on the style image at every iteration."""

    def __init__(self, ours: VGGFeatures, content: torch.Tensor, style: torch.Tensor):
        self.vgg = torchvision.models.vgg19().features.to(content.device).requires_grad_(False)
        self.vgg[: len(ours.body)].load_state_dict(ours.body.state_dict())  # the same weights where they overlap
        self.names, self.mean, self.std = layer_names("vgg19"), ours.mean, ours.std
        self.style = style
        self.content_features = {k: v for k, v in self.features(content).items() if k in CONTENT_LAYERS}

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x, out = (images - self.mean) / self.std, {}
        for name, layer in zip(self.names, self.vgg):
            x = layer(x)
            if name in CONTENT_LAYERS or name in STYLE_LAYERS:
                out[name] = x.clone() if name in CONTENT_LAYERS else x  # in-place ReLUs: keep a copy
        return out

    def loss(self, image: torch.Tensor) -> torch.Tensor:
        features, style = self.features(image), self.features(self.style)
        content = sum(F.mse_loss(features[k], v) for k, v in self.content_features.items())
        grams = sum(w * F.mse_loss(gram_matrix(features[k]), gram_matrix(style[k])) for k, w in STYLE_LAYERS.items())
        return content + STYLE_WEIGHT * grams


def adam_step(optimizer: torch.optim.Optimizer, loss_fn) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    optimizer.step()


def gatys(size: int, iterations: int, device: torch.device) -> float:
    torch.manual_seed(0)
    content, style = torch.rand(1, 3, size, size, device=device), torch.rand(1, 3, size, size, device=device)
    features = VGGFeatures([*CONTENT_LAYERS, *STYLE_LAYERS], pretrained=False).to(device)
    ours = PerceptualLoss(features, CONTENT_LAYERS, STYLE_LAYERS, 1.0, STYLE_WEIGHT, 0.0)
    ours.set_style([style], [1.0])
    targets = ours.content_targets(content)
    baseline = BaselineGatys(features, content, style)

    images = {name: content.clone().requires_grad_(True) for name in ("baseline", "ours")}
    losses = {
        "baseline": lambda: baseline.loss(images["baseline"]),
        "ours": lambda: ours(images["ours"], targets)["loss"],
    }
    start = {name: loss().item() for name, loss in losses.items()}
    assert abs(start["ours"] - start["baseline"]) <= 1e-3 * abs(start["baseline"]), start
    print(f"gatys loss at the start: ours {start['ours']:.6g}, baseline {start['baseline']:.6g}")

    optimizers = {name: torch.optim.Adam([image], lr=0.01) for name, image in images.items()}
    results = timed(
        {name: lambda name=name: adam_step(optimizers[name], losses[name]) for name in losses}, iterations, device
    )
    for name, seconds in results.items():
        print(f"gatys iteration at {size} px, {name}: {seconds * 1000:.1f} ms")
    return results["baseline"] / results["ours"]


@torch.inference_mode()
def fast_style(size: int, images: int, batch: int, device: torch.device) -> float:
    torch.manual_seed(0)
    net = TransformerNet().to(device).eval()
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
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=10, help="timed Gatys iterations (median)")
    parser.add_argument("--images", type=int, default=16, help="fast style: images per timed pass")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    keep_freed_memory()  # as run.py does, for both: large temporaries stay in the heap instead of fresh mmaps
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    gatys_ratio = gatys(args.size, args.iterations, device)
    batched_ratio = fast_style(args.size, args.images, args.batch, device)
    print(f"ratio: gatys_iteration = {gatys_ratio:.2f}")
    print(f"ratio: fast_style_batched = {batched_ratio:.2f}")


if __name__ == "__main__":
    main()
