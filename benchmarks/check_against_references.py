"""vit.py's and clip.py's --init loaders against the libraries the layouts come from.

Needs timm and open_clip (pip install timm open_clip_torch), which the project itself never
imports. Random weights stand in for published ones, so nothing is downloaded: every parameter of
the reference model is perturbed (norms and biases included, so that a wrong map shows), saved as a
state dict, loaded through the project's loader, and both models run on the same pixels.

    python benchmarks/check_against_references.py

Prints the largest absolute difference of the outputs per model (0 or float rounding is a pass).
"""

import dataclasses
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import clip  # noqa: E402
import vit  # noqa: E402


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def normalised(x, kind):
    """Pixels in [0, 1] as the reference models take them: (x - mean) / std."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in vit.InputNorm.STATS[kind])
    return (x - mean) / std


def check_timm(path):
    import timm
    from timm.layers import resample_abs_pos_embed
    cases = [("vit_tiny_patch16_224", {}), ("vit_small_patch16_224", dict(img_size=64)),
             ("vit_base_patch16_clip_224", dict(img_size=32, patch_size=8, depth=2, num_classes=7)),
             ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, no_embed_class=True, num_classes=5))]
    for name, kwargs in cases:
        reference = perturbed(timm.create_model(name, pretrained=False, **kwargs))
        torch.save(reference.state_dict(), path)
        size = reference.patch_embed.img_size[0]
        cfg, sd = vit.init_config(dataclasses.replace(vit.Config(), init=path, image_size=size))
        ours = vit.build_model(cfg, sd["head.weight"].shape[0]).eval()
        vit.load_timm_weights(ours, sd)
        x = torch.rand(4, 3, size, size)
        with torch.no_grad():
            diff = (reference(normalised(x, cfg.input_norm)) - ours(x * 2 - 1)).abs().max().item()
        print(f"timm {timm.__version__} {name} {kwargs or ''}: logits max |difference| {diff:.2e} "
              f"(inferred: patch {cfg.patch_size}, width {cfg.dim}, depth {cfg.depth}, heads {cfg.num_heads}, "
              f"class position {cfg.pos_embed_cls}, norm_pre {cfg.norm_pre}, eps {cfg.norm_eps}, {cfg.input_norm})")
    # positions resized at load (224 px weights run at 112 px) against timm's own resampling
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(reference.state_dict(), path)
    cfg, sd = vit.init_config(dataclasses.replace(vit.Config(), init=path, image_size=112))
    ours = vit.build_model(cfg, 1000)
    vit.load_timm_weights(ours, sd)
    theirs = resample_abs_pos_embed(reference.pos_embed.detach(), (7, 7), (14, 14), num_prefix_tokens=1)
    print(f"timm resample_abs_pos_embed 14x14 -> 7x7: max |difference| {(ours.pos_embed - theirs).abs().max().item():.2e}")


def check_open_clip(path):
    import open_clip
    for name in ("ViT-B-32-quickgelu", "ViT-B-16"):
        reference = open_clip.create_model(name, pretrained=None)
        perturbed(reference.visual)
        reference.eval()
        torch.save(reference.state_dict(), path)
        act = {} if "quickgelu" in name else dict(act="gelu")  # the tensors do not say which
        cfg, sd = clip.init_config(dataclasses.replace(clip.Config(), init=path, image_size=224, **act))
        ours = clip.build_model(cfg).image_encoder.eval()
        left_out = clip.load_openai_visual(ours, sd)
        x = torch.rand(2, 3, 224, 224)
        with torch.no_grad():
            diff = (reference.encode_image(normalised(x, "clip")) - ours(x * 2 - 1)).abs().max().item()
        print(f"open_clip {open_clip.__version__} {name}: image embedding max |difference| {diff:.2e} "
              f"({left_out} text-tower tensors not loaded)")


if __name__ == "__main__":
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        check_timm(os.path.join(tmp, "timm.pth"))
        check_open_clip(os.path.join(tmp, "open_clip.bin"))
