"""Memory held by the subject-embedding cache as a run meets more distinct references (issue 13, item 1).

The AnyMS pipeline encodes each reference once and caches its embedding for every later seed and
combination (anyms11 has 28 distinct references). If the cached tensor carries the image encoder's autograd
graph, every reference keeps all of the encoder's activations alive. This measures it on the real encoder:
a random **ViT-H/14** (the config of h94/IP-Adapter ``models/image_encoder``: 32 layers of 1280, 224 px) with
a random IP-Adapter Plus resampler on its hidden states, loaded by ``load_ip_adapter`` into the tiny SDXL
pipeline (the UNet plays no part in encoding). The process runs with ``MALLOC_MMAP_THRESHOLD_=65536``
(:data:`benchmarks.common.EXACT_RSS_ENV`) so that RSS follows the live tensors; RSS is read after the model
is loaded and after each reference is encoded and cached.

    python -m benchmarks.embedding_cache [--references 28] [--dtype bf16]
    PYTHONPATH=<checkout of older code> python -m benchmarks.embedding_cache --references 4   # the code before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks.common import EXACT_RSS_ENV, REPO

VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
             image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(n: int, dtype_name: str) -> dict:
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from anyms.methods.ip_adapter import AnyMSPipeline
    from anyms.tiny import random_ip_adapter_state_dict, tiny_sdxl_components
    from runfolder.clip_vocab import write_clip_tokenizer_files

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    with tempfile.TemporaryDirectory() as tmp:
        components = tiny_sdxl_components(write_clip_tokenizer_files(tmp))
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).to(dtype)
    components.update(image_encoder=encoder, feature_extractor=CLIPImageProcessor())
    pipe = StableDiffusionXLPipeline(**components).to(dtype=dtype)
    state = random_ip_adapter_state_dict(pipe.unet, encoder, plus=True)
    pipe.load_ip_adapter(state, subfolder=None, weight_name="random")
    pipeline = AnyMSPipeline(pipe, adapter_id="vit-h-random", default_size=64, plus=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(n)]
    loaded = rss_bytes()
    after = []
    for image in images:
        pipeline.subject_embeddings([image], cfg=True)
        after.append(rss_bytes() - loaded)
    cached = list(pipeline._embedding_cache.values())
    return {"references": n, "dtype": dtype_name, "rss_after_load": loaded, "growth_after_each": after,
            "cached_with_graph": sum(e.grad_fn is not None for e in cached)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--references", type=int, default=28)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.references, args.dtype)))
        return
    env = {**os.environ, **EXACT_RSS_ENV}
    out = subprocess.run([sys.executable, "-m", "benchmarks.embedding_cache", "--worker", "--references",
                          str(args.references), "--dtype", args.dtype], env=env, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    growth = result["growth_after_each"]
    gib = 2**30
    print(f"ViT-H/14 + IP-Adapter Plus, random weights, {result['dtype']}, {result['references']} distinct references")
    print(f"  RSS after loading: {result['rss_after_load'] / gib:.2f} GiB; cached embeddings holding a graph: "
          f"{result['cached_with_graph']}")
    print(f"  growth after the 1st reference: {growth[0] / gib:.3f} GiB; after the last: {growth[-1] / gib:.3f} GiB; "
          f"per added reference: {(growth[-1] - growth[0]) / max(1, len(growth) - 1) / gib:.3f} GiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
