"""Images per second of batched attribution maps (as task=saliency computes them) against one image at a time.

    python benchmarks/saliency.py                       # shapes classifier (64 px), CPU
    python benchmarks/saliency.py --model resnet50 --image-size 224 --device cuda

Weights are random (speed does not depend on them; nothing is downloaded); the shapes classifier's width and the
methods' settings are task=saliency's (conf/model/shapes_classifier.yaml, conf/model/saliency.yaml). Ends with one
line per method: `ratio: <method> = <time one at a time / time batched>`.
"""

from __future__ import annotations

import argparse
import time

import torch

from datamodules.shapes import SHAPES
from framework.config import model_settings
from lightning_modules.explain.attributions import METHODS, Attributions
from lightning_modules.explain.classifier import PixelClassifier, classifier_to_explain, shapes_net


def timed(function, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="shapes, or a torchvision classifier (random weights)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many timings counts")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model == "shapes":
        width = model_settings("shapes_classifier", scheduler=None)["width"]
        classifier = PixelClassifier(shapes_net(len(SHAPES), width), list(SHAPES))
    else:  # random weights: no checkpoint, no cache
        classifier = classifier_to_explain(args.model, checkpoint=None, pretrained=False, cache_dir="")
    classifier = classifier.to(device).eval().requires_grad_(False)
    saliency = model_settings("saliency")  # task=saliency's settings
    attributions = Attributions(
        classifier,
        saliency["gradcam_layer"] or classifier.last_spatial_layer(),
        **{key: saliency[key] for key in ("smoothgrad_samples", "smoothgrad_noise", "ig_steps", "internal_batch_size")},
    )
    pixels = torch.rand(args.images, 3, args.image_size, args.image_size, device=device)
    targets = torch.randint(len(classifier.class_names), (args.images,), device=device)

    def run(method: str, batch_size: int) -> None:
        for start in range(0, args.images, batch_size):
            attributions.maps(
                method, pixels[start : start + batch_size].clone().requires_grad_(), targets[start : start + batch_size]
            )

    print(f"{args.model} {args.image_size}px, {args.images} images, device {device}, torch {torch.__version__}")
    ratios = {}
    for method in args.methods:
        run(method, args.batch_size)  # warm-up
        batched = min(timed(lambda: run(method, args.batch_size), device) for _ in range(args.repeats))
        single = min(timed(lambda: run(method, 1), device) for _ in range(args.repeats))
        ratios[method] = single / batched
        print(
            f"{method:22s} batched ({args.batch_size}): {args.images / batched:8.1f} images/s   "
            f"one at a time: {args.images / single:8.1f} images/s"
        )
    for method, ratio in ratios.items():
        print(f"ratio: {method} = {ratio:.2f}")


if __name__ == "__main__":
    main()
