"""Sampling speed of pixel_ar's decoder with the static KV cache against recomputing the sequence.

    OMP_NUM_THREADS=1 python benchmarks/pixel_ar_cache.py              # the cpu preset's model, 8..32 px
    python benchmarks/pixel_ar_cache.py --preset gpu --device cuda     # the gpu preset's model
    python benchmarks/pixel_ar_cache.py --sizes 8,12 --full_tokens 100000   # no extrapolation

For each image size: one image of T = size^2 * 3 tokens after a class token (batch 1, randomly
initialised weights: speed does not depend on them). The cached path is generate() in full. The
recompute path runs generate(use_cache=False) in full up to --full_tokens tokens; past that, the
forward pass is timed at --probes evenly spaced lengths and the interpolation summed over the T
steps (each recompute step is one forward over the sequence so far), which is said in the table;
the largest size run in full is also estimated that way, to show how close the estimate is.
Both paths are checked to give the same tokens (float64 copy, a 64-token prefix). Prints ratios and
asserts nothing about time.
"""

import argparse
import copy
import dataclasses
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import pixel_ar as pa  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="8,12,16,24,32", help="image sizes in pixels")
    parser.add_argument("--preset", default="cpu", choices=list(pa.PRESETS), help="model width and depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full_tokens", type=int, default=800, help="run the recompute path in full up to this T")
    parser.add_argument("--probes", type=int, default=12, help="forward lengths timed past --full_tokens")
    args = parser.parse_args()
    cfg = pa.Config(**pa.PRESETS[args.preset])
    device = torch.device(args.device)
    print(f"{args.preset} preset model: dim {cfg.dim}, depth {cfg.depth}, heads {cfg.num_heads}; device {device}, "
          f"{torch.get_num_threads()} threads")
    print("| image | tokens T | sample s, cache | sample s, recompute | speed-up | same tokens |")
    print("|---|---|---|---|---|---|")
    last_full = None
    for size in [int(s) for s in args.sizes.split(",")]:
        T = size * size * 3
        torch.manual_seed(0)
        model = pa.build_model(dataclasses.replace(cfg, image_size=size, context=0), 18, 3).to(device).eval()
        cached = pa.sampling_seconds(model, T, True, device)
        extrapolated = T > args.full_tokens
        recompute = pa.sampling_seconds(model, T, False, device, args.probes if extrapolated else 0)
        if not extrapolated:
            last_full = (size, model, T, recompute)
        exact = copy.deepcopy(model).double()
        prompt = torch.full((2, 1), pa.NUM_VALUES + 3, device=device)
        same = torch.equal(*(pa.generate(exact, prompt, min(T, 64), use_cache=c, generator=torch.Generator(device).manual_seed(0))
                             for c in (True, False)))
        note = " (extrapolated)" if extrapolated else ""
        print(f"| {size} px | {T} | {cached:.2f} | {recompute:.1f}{note} | {recompute / cached:.1f}x | {'yes' if same else 'NO'} |",
              flush=True)
    if last_full is not None:
        size, model, T, measured = last_full
        estimate = pa.sampling_seconds(model, T, False, device, args.probes)
        print(f"check of the extrapolation at {size} px: estimated {estimate:.1f} s, measured {measured:.1f} s "
              f"({100 * (estimate / measured - 1):+.0f}%)")


if __name__ == "__main__":
    main()
