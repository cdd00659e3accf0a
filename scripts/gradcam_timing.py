"""Grad-CAM time per image on this machine, printed as JSON.

    python scripts/gradcam_timing.py                      # efficientnet_lite0 at 128 and 224 px, CPU
    python scripts/gradcam_timing.py --threads 1          # per-core cost, robust on a busy machine
    python scripts/gradcam_timing.py --backbone resnet18 --sizes 224 --device cuda

Reports the batched Grad-CAM (one forward + one backward per batch, upsampling, normalisation),
the same done one image at a time, and plain inference (forward only) for scale: each as the best
of `repeats` in wall time and in process CPU time (CPU time hardly moves when other jobs share
the cores; wall time does). Weights do not change the timing, so none are loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from defect_detection.explain.gradcam import compute_cams, gradcam_layer_for
from defect_detection.models.backbones import build_network


def _best_ms_per_image(fn, n_images: int, repeats: int) -> dict[str, float]:
    fn()  # warm-up (allocator, kernels, Captum hooks)
    wall, cpu = [], []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        began, began_cpu = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return {"wall": round(1000.0 * min(wall) / n_images, 2), "cpu": round(1000.0 * min(cpu) / n_images, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_network(args.backbone, pretrained=False).to(args.device).eval()
    layer = gradcam_layer_for(args.backbone)
    load_before = os.getloadavg()[0]
    results = []
    for size in args.sizes:
        x = torch.randn(args.batch_size, 3, size, size, device=args.device)

        def forward(x=x):
            with torch.inference_mode():
                net(x)

        results.append({
            "image_size": size,
            "gradcam_batched_ms_per_image": _best_ms_per_image(
                lambda x=x: compute_cams(net, layer, x, batch_size=args.batch_size), len(x), args.repeats),
            "gradcam_one_at_a_time_ms_per_image": _best_ms_per_image(
                lambda x=x: compute_cams(net, layer, x, batch_size=1), len(x), args.repeats),
            "inference_ms_per_image": _best_ms_per_image(forward, len(x), args.repeats),
        })
    print(json.dumps({"backbone": args.backbone, "layer": layer, "device": args.device,
                      "batch_size": args.batch_size, "repeats": args.repeats,
                      "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                      "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
