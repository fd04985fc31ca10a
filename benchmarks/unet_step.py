"""One real-size UNet step with classifier-free guidance: AnyMS (``fused``) against the stock IP-Adapter.

The UNet is built from the real model's config (SD1.5 at 512 px by default, SDXL at 1024 px with
``--model sdxl``) with **random weights**, and a random IP-Adapter Plus of the real sizes (the resampler
of ``ip-adapter-plus_sd15`` / ``ip-adapter-plus_sdxl_vit-h``, 16 tokens a subject) is loaded through
diffusers' own ``UNet2DConditionModel._load_ip_adapter_weights``. Random weights are fine for timing and
memory: the work does not depend on the values. fp32 on the CPU, fp16 on CUDA.

Time: one worker process builds the model once and alternates the variants' processors between steps
(A B, B A, ... after a warm-up step each): the same weights and inputs, so two steps differ only in the
cross-attention processors, and load changes hit both. The ratio is the median of the paired per-round
ratios. AnyMS is installed as by default (``reuse_projected_tokens`` off: the subjects' tokens projected in
every step, as the stock processor does); each variant keeps its processor objects between steps.

Activation memory: each variant in a worker process of its own, started with glibc set to map every
allocation of 64 KiB or more on its own and unmap it when freed (``MALLOC_MMAP_THRESHOLD_``), so that RSS
follows the live tensors: peak RSS over a step (the second: the first also sets up kernel libraries) minus
RSS once the model is loaded (on CUDA: peak allocated minus allocated). With glibc's default the peak would include whatever the allocator keeps
from earlier allocations, hundreds of MB here, differently in every process. The memory workers run side
by side when both models fit in memory, else one after the other.

    python -m benchmarks.unet_step [--model sd15|sdxl] [--rounds N] [--subjects 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from benchmarks.common import EXACT_RSS_ENV, REPO, fmt_bytes, log, resolve_device

VARIANTS = ("stock_joint", "anyms_fused")
REFERENCE = "stock_joint"
RANDOM_WEIGHTS_NOTE = "random weights at real size (fine for timing and memory, meaningless as images)"
TINY_NOTE = "the tiny random UNet of the tests: checks the code paths, measures nothing"

# unet/config.json of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 (the architecture keys)
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)
# the tiny SD1.5-like UNet of anyms.tiny, for --smoke
TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
    norm_num_groups=32,
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    unet: dict
    image_size: int  # pixels; the latent is image_size / 8
    image_embed_dim: int  # the image encoder's hidden size (CLIP ViT-H: 1280)
    image_embed_tokens: int  # its penultimate hidden states (ViT-H/14 at 224 px: 257)
    resampler_dim: int  # IP-Adapter Plus's perceiver resampler width
    resampler_heads: int
    sdxl: bool = False
    approx_weight_bytes: int = 0  # fp32, for the memory fit check before a worker reports its own

    @property
    def label(self) -> str:
        return f"{self.name}-{self.image_size}px"


MODELS = {
    "sd15": ModelSpec("sd15", SD15_UNET, 512, 1280, 257, 768, 12, approx_weight_bytes=3_500_000_000),
    "sdxl": ModelSpec("sdxl", SDXL_UNET, 1024, 1280, 257, 1280, 20, sdxl=True, approx_weight_bytes=10_400_000_000),
    "tiny": ModelSpec("tiny", TINY_UNET, 64, 32, 5, 64, 1, approx_weight_bytes=10_000_000),
}


# ------------------------------------------------------------------------------------------- the model


def ip_adapter_plus_state_dict(unet, spec: ModelSpec, tokens: int = 16, seed: int = 0) -> dict:
    """Random IP-Adapter Plus weights at the real sizes, in the original format ``load_ip_adapter`` reads
    (as :func:`anyms.tiny.random_ip_adapter_state_dict`, with the real resampler width and heads)."""
    import torch

    from anyms.tiny import cross_attention_shapes

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    dim, inner = spec.resampler_dim, spec.resampler_heads * 64  # the loader reads heads as inner // 64
    out_dim = unet.config.cross_attention_dim
    proj = {"latents": rand(1, tokens, dim, std=dim**-0.5), "proj_in.weight": rand(dim, spec.image_embed_dim),
            "proj_in.bias": torch.zeros(dim), "proj_out.weight": rand(out_dim, dim), "proj_out.bias": torch.zeros(out_dim),
            "norm_out.weight": torch.ones(out_dim), "norm_out.bias": torch.zeros(out_dim)}
    for i in range(4):  # diffusers builds depth 4
        p = f"layers.{i}."
        proj.update({
            p + "0.norm1.weight": torch.ones(dim), p + "0.norm1.bias": torch.zeros(dim),
            p + "0.norm2.weight": torch.ones(dim), p + "0.norm2.bias": torch.zeros(dim),
            p + "0.to_q.weight": rand(inner, dim), p + "0.to_kv.weight": rand(2 * inner, dim),
            p + "0.to_out.weight": rand(dim, inner),
            p + "1.0.weight": torch.ones(dim), p + "1.0.bias": torch.zeros(dim),
            p + "1.1.weight": rand(4 * dim, dim), p + "1.3.weight": rand(dim, 4 * dim),
        })
    layers = {}
    for i, (width, cross) in enumerate(cross_attention_shapes(unet)):
        layers[f"{2 * i + 1}.to_k_ip.weight"] = rand(width, cross, std=cross**-0.5)
        layers[f"{2 * i + 1}.to_v_ip.weight"] = rand(width, cross, std=cross**-0.5)
    return {"image_proj": proj, "ip_adapter": layers}


def build_unet(spec: ModelSpec, device: str, dtype, seed: int = 0):
    """The UNet of ``spec`` with random weights and a random IP-Adapter Plus loaded the way diffusers loads
    a real one (``_load_ip_adapter_weights``: IP-Adapter processors on every cross-attention layer)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet).eval().requires_grad_(False)
    unet._load_ip_adapter_weights([ip_adapter_plus_state_dict(unet, spec, seed=seed + 1)])
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)
    return unet.requires_grad_(False)


def step_inputs(unet, spec: ModelSpec, n: int, device: str, dtype, seed: int = 0) -> dict:
    """Keyword arguments of one CFG step (batch 2): latents, timestep, text states, and the ``[2, n, 257,
    1280]`` image encoder states the IP-Adapter's resampler turns into ``n x 16`` tokens per layer."""
    import torch

    g = torch.Generator().manual_seed(seed)
    latent = spec.image_size // 8
    text_dim = unet.config.cross_attention_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    added = {"image_embeds": [rand(2, n, spec.image_embed_tokens, spec.image_embed_dim)]}
    if spec.sdxl:  # pooled text embeddings and the size/crop conditioning
        added["text_embeds"] = rand(2, 1280)
        added["time_ids"] = torch.tensor([[spec.image_size, spec.image_size, 0, 0, spec.image_size, spec.image_size]] * 2,
                                         device=device, dtype=dtype)
    return dict(sample=rand(2, 4, latent, latent), timestep=torch.tensor(500, device=device),
                encoder_hidden_states=rand(2, 77, text_dim), added_cond_kwargs=added)


def use_variant(unet, variant: str, spec: ModelSpec, n: int):
    """Puts the processors of ``variant`` on the UNet: AnyMS's for ``anyms_*``, the stock ones otherwise."""
    from anyms.core.attention import install, uninstall

    from benchmarks.attention import layout_for

    uninstall(unet)
    if variant != "stock_joint":
        latent = spec.image_size // 8
        install(unet, variant.removeprefix("anyms_"), layout_for(n), (latent, latent))


# ------------------------------------------------------------------------------------------- workers


def time_worker(model: str, variants: list[str], n: int, device: str, rounds: int, warmup: bool) -> dict:
    """In a worker process: one model, the variants' processors swapped between steps (the same weights and
    inputs, so steps differ only in the cross-attention processors), ``rounds`` rounds A B, B A, ... after a
    warm-up step each. Returns the seconds of every step."""
    import torch

    spec = MODELS[model]
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    start = time.perf_counter()
    unet = build_unet(spec, device, dtype)
    inputs = step_inputs(unet, spec, n, device, dtype)
    load_s = time.perf_counter() - start
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    finite = True
    processors = {}  # each variant's processor objects, kept: AnyMS's keep its projected image tokens between
    for v in variants:  # steps, as over the steps of a generation
        use_variant(unet, v, spec, n)
        processors[v] = dict(unet.attn_processors)

    def step(variant: str) -> float:
        nonlocal finite
        unet.set_attn_processor(dict(processors[variant]))
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = unet(**inputs).sample
        sync()
        elapsed = time.perf_counter() - t0
        finite = finite and bool(torch.isfinite(out).all())
        return elapsed

    warmup_s = {v: step(v) for v in variants} if warmup else {}
    for r in range(rounds):
        for i in range(len(variants)):
            v = variants[(r + i) % len(variants)]
            seconds[v].append(step(v))
            log(f"    round {r + 1}/{rounds} {v}: {seconds[v][-1]:.2f} s")
    return {"seconds": seconds, "warmup_s": warmup_s, "load_s": load_s, "finite": finite,
            "params": sum(p.numel() for p in unet.parameters())}


def memory_worker(model: str, variant: str, n: int, device: str) -> dict:
    """In a worker process of its own (on the CPU started with :data:`benchmarks.common.EXACT_RSS_ENV`):
    peak memory over a step minus the memory once the model is loaded. The step measured is the second:
    the first one's one-time work (kernel libraries' set-up) is not a step's activation memory."""
    import gc

    import torch

    from benchmarks.common import peak_rss_bytes, reset_peak_rss, rss_bytes

    spec = MODELS[model]
    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    unet = build_unet(spec, device, dtype)
    use_variant(unet, variant, spec, n)
    inputs = step_inputs(unet, spec, n, device, dtype)
    gc.collect()
    loaded = torch.cuda.memory_allocated() if cuda else rss_bytes()
    with torch.inference_mode():
        unet(**inputs)  # the first step
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    with torch.inference_mode():
        unet(**inputs)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {"variant": variant, "activation_bytes": peak - loaded, "loaded_bytes": loaded}


def _worker_command(kind: str, model: str, n: int, device: str, threads: int | None, **extra) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.unet_step", f"--{kind}-worker", "--model", model, "--subjects", str(n),
           "--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    for key, value in extra.items():
        if value is True:
            cmd.append(f"--{key.replace('_', '-')}")
        elif value not in (None, False):
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def _start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    # stderr passes through: the workers' progress lines
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"unet_step worker {' '.join(proc.args[3:6])} failed (exit {proc.returncode}); see its stderr above")
    return json.loads(out.strip().splitlines()[-1])


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------- the run


@dataclass
class StepResult:
    model: str
    rows: list[dict] = field(default_factory=list)
    memory_together: bool = True
    rounds: int = 0
    subjects: int = 0
    note: str = RANDOM_WEIGHTS_NOTE


def run(model: str = "sd15", rounds: int | None = None, subjects: int = 5, device: str = "auto",
        quick: bool = False, threads: int | None = None, variants=VARIANTS) -> StepResult:
    """Times both variants in one worker (interleaved), then measures each one's activation memory in a
    worker of its own."""
    device = resolve_device(device)
    spec = MODELS[model]
    rounds = rounds or (2 if model == "tiny" else 2 if quick or model == "sdxl" else 5)
    note = TINY_NOTE if model == "tiny" else RANDOM_WEIGHTS_NOTE
    if model == "tiny":
        threads = threads or 1  # tiny tensors: threads only wait for each other
    log(f"  unet step {spec.label}, {subjects} subjects, {rounds} rounds after a warm-up step each; {note}")
    timing = _result(_start(_worker_command("time", model, subjects, device, threads, variants=",".join(variants),
                                            rounds=rounds)))
    log("  activation memory, one worker per variant (allocator returning freed memory at once)")
    env = None if device.startswith("cuda") else {**os.environ, **EXACT_RSS_ENV}
    commands = [_worker_command("memory", model, subjects, device, threads, variant=v) for v in variants]
    available = _available_memory()
    together = device.startswith("cuda") or available is None or available > len(variants) * 1.5 * spec.approx_weight_bytes
    if together:
        memory = [_result(p) for p in [_start(c, env) for c in commands]]
    else:
        log(f"  {len(variants)} {spec.label} models do not fit in {fmt_bytes(available)} available: one after another")
        memory = [_result(_start(c, env)) for c in commands]
    return _summarize(spec, timing, {m["variant"]: m for m in memory}, rounds, subjects, together, note)


def one_step_seconds(model: str, subjects: int = 5, device: str = "auto", warmup: bool = True,
                     threads: int | None = None) -> dict:
    """One UNet step with AnyMS (``fused``) in a fresh worker, for the cost of generating an image: after a
    warm-up step, or (``warmup=False``, when a step costs minutes) the first step, one-time costs included."""
    device = resolve_device(device)
    timing = _result(_start(_worker_command("time", model, subjects, device, threads, variants="anyms_fused",
                                            rounds=1, no_warmup=not warmup)))
    seconds = timing["seconds"]["anyms_fused"][0]
    log(f"  one {MODELS[model].label} step with AnyMS: {seconds:.1f} s ({'after a warm-up step' if warmup else 'the first step'})")
    return {"model": MODELS[model].label, "seconds": seconds, "warmup": warmup, "load_s": timing["load_s"]}


def _summarize(spec: ModelSpec, timing: dict, memory: dict, rounds: int, subjects: int, memory_together: bool,
               note: str) -> StepResult:
    result = StepResult(spec.label, memory_together=memory_together, rounds=rounds, subjects=subjects, note=note)
    ref_s, ref_mem = timing["seconds"][REFERENCE], memory[REFERENCE]["activation_bytes"]
    for variant, seconds in timing["seconds"].items():
        ratio = statistics.median(a / b for a, b in zip(seconds, ref_s))  # paired: same round
        activation = memory[variant]["activation_bytes"]
        result.rows.append({
            "model": spec.label, "variant": variant, "median_s": round(statistics.median(seconds), 4),
            "spread_s": round(_iqr(seconds), 4), "ratio_to_stock": round(ratio, 4),
            "activation_bytes": int(activation), "activation_ratio": round(activation / ref_mem, 4),
            "loaded_bytes": int(memory[variant]["loaded_bytes"]), "warmup_s": round(timing["warmup_s"][variant], 4),
            "finite": timing["finite"], "subjects": subjects, "rounds": rounds,
        })
    return result


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def markdown(result: StepResult) -> str:
    lines = [f"UNet step, {result.model}, CFG batch 2, {result.subjects} subjects: {result.rounds} rounds, the "
             "variants' processors swapped between steps of one model (interleaved); activation memory in one "
             f"process per variant; {result.note}.", "",
             "| model | variant | median s | spread s (IQR) | / stock | activation memory | / stock |",
             "|---|---|---|---|---|---|---|"]
    for r in result.rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['median_s']:.2f} | {r['spread_s']:.2f} | "
                     f"{r['ratio_to_stock']:.3f} | {fmt_bytes(r['activation_bytes'])} | {r['activation_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    parser.add_argument("--smoke", action="store_true", help="the tiny UNet: checks the code paths in seconds")
    parser.add_argument("--time-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--no-warmup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = "tiny" if args.smoke else args.model
    device = resolve_device(args.device)
    if args.time_worker or args.memory_worker:
        import warnings

        import torch

        from diffusers.utils import logging as diffusers_logging

        warnings.simplefilter("ignore")  # LayoutWarnings at coarse grids, diffusers' deprecations: noise here
        diffusers_logging.set_verbosity_error()  # its advice on casting a model built here in fp32
        if args.threads:
            torch.set_num_threads(args.threads)
        result = (time_worker(model, args.variants.split(","), args.subjects, device, args.rounds, not args.no_warmup)
                  if args.time_worker else memory_worker(model, args.variant, args.subjects, device))
        print(json.dumps(result))
        return
    print(markdown(run(model, args.rounds, args.subjects, args.device, args.quick, args.threads)))


if __name__ == "__main__":
    main()
