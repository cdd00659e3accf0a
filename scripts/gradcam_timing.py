"""Map time per image for each explanation method on this machine, printed as JSON.

    python scripts/gradcam_timing.py                      # efficientnet_lite0 at 128 and 224 px, CPU
    python scripts/gradcam_timing.py --threads 1          # per-core cost, robust on a busy machine
    python scripts/gradcam_timing.py --backbone resnet18 --sizes 224 --device cuda
    python scripts/gradcam_timing.py --methods gradcam:net.conv_head anomaly_map

Methods: `gradcam` (the backbone config's gradcam_layer, the default), `gradcam:<layer>[,<layer>]`
(other layers, fused by --fusion) and `anomaly_map` (PatchCore's patch distances, with a bank of
--bank-size random features: its cost, not its quality). Each is timed batched (one forward + one
backward per batch for Grad-CAM at all its layers, one forward for the anomaly map, upsampling and
normalisation included) and one image at a time, next to one plain forward pass (inference mode)
of the network the map comes from: each as the best of `repeats` in wall time and in process CPU
time (CPU time hardly moves when other jobs share the cores; wall time does), the map and the
forward timed alternately so both see the same load. `forward_passes` = the map's batched CPU
time / the forward's. Weights do not change the timing, so none are loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from defect_detection.explain.gradcam import compute_cams, gradcam_layer_for, native_maps
from defect_detection.models.backbones import build_network


def _clock(fn) -> tuple[float, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began, began_cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began, time.process_time() - began_cpu


def _paired_ms_per_image(fn, reference, n_images: int, repeats: int) -> tuple[dict, dict]:
    """Best of `repeats` for fn and for its reference forward, timed alternately so that both see
    the same load on a shared machine."""
    fn(), reference()  # warm-up (allocator, kernels, Captum hooks)
    runs = {"fn": [], "ref": []}
    for _ in range(repeats):
        runs["ref"].append(_clock(reference))
        runs["fn"].append(_clock(fn))

    def best(times):
        return {"wall": round(1000.0 * min(t[0] for t in times) / n_images, 2),
                "cpu": round(1000.0 * min(t[1] for t in times) / n_images, 2)}

    return best(runs["fn"]), best(runs["ref"])


def _map_fn(method: str, args, net: torch.nn.Module):
    """(fn(x, batch_size) computing the maps of `method`, what it shows, the network whose one
    forward pass it is compared with: the classifier for Grad-CAM, PatchCore's for its map)."""
    if method == "anomaly_map":
        from defect_detection.models.families.patchcore import PatchCoreNet

        pc = PatchCoreNet(args.backbone, args.strides, pretrained=False, bank_size=args.bank_size)
        pc.bank.normal_()
        pc = pc.to(args.device).eval()
        return (lambda x, bs: native_maps(pc, x, bs)), f"strides {args.strides}, bank {args.bank_size}", pc
    name, _, layers = method.partition(":")
    if name != "gradcam":
        raise SystemExit(f"unknown method {method}: use gradcam, gradcam:<layer>[,<layer>] or anomaly_map")
    layer = layers.split(",") if layers else gradcam_layer_for(args.backbone)
    return (lambda x, bs: compute_cams(net, layer, x, batch_size=bs, fusion=args.fusion)), layer, net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--methods", nargs="+", default=["gradcam", "anomaly_map"])
    parser.add_argument("--fusion", default="mean", help="for several Grad-CAM layers: mean or product")
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 16],
                        help="anomaly_map: PatchCore strides")
    parser.add_argument("--bank-size", type=int, default=16384, help="anomaly_map: bank features (max_bank)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_network(args.backbone, pretrained=False).to(args.device).eval()
    fns = {m: _map_fn(m, args, net) for m in args.methods}
    load_before = os.getloadavg()[0]
    results = []
    for size in args.sizes:
        x = torch.randn(args.batch_size, 3, size, size, device=args.device)
        row = {"image_size": size, "methods": {}}
        for method, (fn, shows, network) in fns.items():
            def forward(network=network, x=x):
                with torch.inference_mode():
                    network(x)

            batched, inference = _paired_ms_per_image(lambda fn=fn, x=x: fn(x, args.batch_size), forward,
                                                      len(x), args.repeats)
            single, _ = _paired_ms_per_image(lambda fn=fn, x=x: fn(x, 1), forward, len(x), args.repeats)
            row["methods"][method] = {
                "shows": shows, "batched_ms_per_image": batched, "one_at_a_time_ms_per_image": single,
                "forward_ms_per_image": inference,
                "forward_passes": round(batched["cpu"] / max(inference["cpu"], 1e-9), 2)}
        results.append(row)
    print(json.dumps({"backbone": args.backbone, "device": args.device,
                      "batch_size": args.batch_size, "repeats": args.repeats,
                      "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                      "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                      "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
