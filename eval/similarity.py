"""Identity and text similarity models of the evaluation (DESIGN.md section 3): CLIP-I, CLIP-T, DINO, DreamSim.

Each scorer loads its model once, from constructor arguments only (a hub id / pretrained tag or a local
folder or file, and a device), through the package's own loading code; it then scores lists of PIL images
in batches, under ``torch.no_grad``, on that device. All scores are on a 0-100 scale:

- :class:`ClipScorer`: open_clip. CLIP-I = 100 x cosine of the two images' embeddings; CLIP-T = 100 x
  cosine of the whole image's and the prompt's embeddings. Default ``ViT-B-32`` with the ``openai``
  weights (run with QuickGELU, as those weights were trained: see the class).
- :class:`DinoScorer`: 100 x cosine of the final-norm CLS tokens, preprocessing resize 256 bicubic, center
  crop 224, ImageNet normalization. ``backend="dinov2"``: DINOv2 ViT-S/14 (``facebook/dinov2-small``) through
  transformers' ``Dinov2Model`` (the AnyMS paper's DINO); ``backend="transformers"``: DINO v1 ViT-S/16
  (``facebook/dino-vits16``) through ``ViTModel`` (MS-Diffusion's and DreamBooth's DINO); ``backend="timm"``
  loads ``vit_small_patch16_224.dino``. A checkpoint whose keys do not match the class exactly is refused
  (a DINOv2 checkpoint read by ``ViTModel`` would silently re-initialize its LayerScale weights).
- :class:`DreamSimScorer`: the dreamsim package's own model, 100 x (1 - distance), default ``"ensemble"``.

A weight that is not there raises one :class:`MissingWeightsError` naming the model and how to get it,
instead of a hub stack trace. Nothing here imports ``anyms``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
DEFAULT_DINO_MODEL = {"transformers": "facebook/dino-vits16", "timm": "vit_small_patch16_224.dino",
                      "dinov2": "facebook/dinov2-small"}
DEFAULT_DREAMSIM_TYPE = "ensemble"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".tar", ".ckpt")


class MissingWeightsError(FileNotFoundError):
    """A model's weights are not where the configuration points. The message names the model and how to
    get the weights; it is raised ``from None`` so no hub stack trace hides it."""


# --------------------------------------------------------------------------------------------- helpers


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        raise TypeError("expected a list of PIL images, got a single image: wrap it in a list")
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise TypeError(f"expected PIL images, got {type(im).__name__}")
        out.append(im if im.mode == "RGB" else im.convert("RGB"))
    return out


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_pairs(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"pairwise similarity needs two lists of the same length, got {len(a)} and {len(b)}")


def _pairwise_cosine_x100(fa: torch.Tensor, fb: torch.Tensor) -> list[float]:
    return (100.0 * F.cosine_similarity(fa.double(), fb.double(), dim=-1)).tolist()


def _looks_like_path(value: str) -> bool:
    """A local path rather than a hub id or tag: it exists, or is absolute / relative-dotted, or names a file."""
    return (
        Path(value).expanduser().is_absolute()
        or value.startswith(("./", "../", "~"))
        or value.endswith(_WEIGHT_SUFFIXES)
        or Path(value).exists()
    )


def _has_transformers_weights(folder: Path) -> bool:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return any((folder / n).is_file() for n in names)


# ------------------------------------------------------------------------------------------------ CLIP


class ClipScorer:
    """CLIP-I and CLIP-T with an open_clip model.

    ``model_name`` is an open_clip model name (``"ViT-B-32"``), or ``"local-dir:/path"`` for a folder in the
    hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``),
    or ``"hf-hub:org/repo"``. ``pretrained`` (only with a plain model name) is an open_clip pretrained tag
    (``"openai"``) or the path of a checkpoint file.

    QuickGELU: open_clip 3.x builds ``ViT-B-32`` with plain GELU even when asked for the ``openai`` weights,
    which were trained with QuickGELU (it only warns). ``force_quick_gelu=None`` takes the value the
    pretrained tag declares (True for ``openai``), so the default scorer runs the OpenAI model as trained;
    with a checkpoint file, name a ``-quickgelu`` model or pass ``force_quick_gelu=True`` for OpenAI weights.

    ``local_files_only=True`` resolves a pretrained tag from the local Hugging Face cache only (fails at
    once offline instead of after the hub client's retries).
    """

    def __init__(
        self,
        model_name: str = DEFAULT_CLIP_MODEL,
        pretrained: str | os.PathLike | None = DEFAULT_CLIP_PRETRAINED,
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None = None,
        force_quick_gelu: bool | None = None,
        local_files_only: bool = False,
        batch_size: int = 32,
    ) -> None:
        import open_clip

        self.model_name = model_name
        self.pretrained = None if pretrained is None else str(pretrained)
        self.device = torch.device(device)
        self.batch_size = batch_size
        cache_dir = None if cache_dir is None else str(cache_dir)

        create_kwargs: dict = {}
        if model_name.startswith("local-dir:"):
            _check_open_clip_folder(model_name)
            source = None
        elif model_name.startswith("hf-hub:"):
            source = None
        else:
            source, tag_cfg = _resolve_open_clip_weights(
                model_name, self.pretrained, cache_dir=cache_dir, local_files_only=local_files_only
            )
            if tag_cfg:  # what open_clip itself takes from a tag: its preprocessing and activation
                for key in ("mean", "std", "interpolation", "resize_mode"):
                    if key in tag_cfg:
                        create_kwargs[f"image_{key}"] = tag_cfg[key]
                if force_quick_gelu is None:
                    force_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=source,
                device=self.device,
                cache_dir=cache_dir,
                force_quick_gelu=bool(force_quick_gelu),
                require_pretrained=True,
                **create_kwargs,
            )
            tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except Exception as err:  # hub / download failures: one clear message
            if model_name.startswith("hf-hub:"):
                repo = model_name.split(":", 1)[1]
                raise MissingWeightsError(
                    f"CLIP model {model_name!r} could not be loaded ({type(err).__name__}: {err}). Download the "
                    f"repo https://huggingface.co/{repo} (open_clip_config.json and the open_clip weights) with "
                    f"network, then pass model_name='local-dir:<folder>'."
                ) from None
            raise
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalized image embeddings, [N, D] float32 on the CPU."""
        feats = []
        for chunk in _chunks(_rgb(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im) for im in chunk]).to(self.device)
            feats.append(self.model.encode_image(pixels).float().cpu())
        return F.normalize(torch.cat(feats), dim=-1) if feats else torch.empty(0)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings, [N, D] float32 on the CPU."""
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got a single string: wrap it in a list")
        feats = []
        for chunk in _chunks(list(texts), self.batch_size):
            tokens = self.tokenizer(list(chunk)).to(self.device)
            feats.append(self.model.encode_text(tokens).float().cpu())
        return F.normalize(torch.cat(feats), dim=-1) if feats else torch.empty(0)

    def clip_i(self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]) -> list[float]:
        """CLIP-I of each pair (images_a[i], images_b[i]): 100 x cosine of the image embeddings."""
        _check_pairs(images_a, images_b)
        return _pairwise_cosine_x100(self.image_features(images_a), self.image_features(images_b))

    def clip_t(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """CLIP-T of each pair (images[i], prompts[i]): 100 x cosine of image and text embeddings."""
        _check_pairs(images, prompts)
        return _pairwise_cosine_x100(self.image_features(images), self.text_features(prompts))


def _check_open_clip_folder(model_name: str) -> None:
    folder = Path(model_name.split(":", 1)[1])
    has_weights = folder.is_dir() and any(
        p.suffix in (".safetensors", ".bin", ".pth") for p in folder.iterdir() if p.is_file()
    )
    if not (folder / "open_clip_config.json").is_file() or not has_weights:
        raise MissingWeightsError(
            f"CLIP model {model_name!r}: no open_clip model in {folder} (it needs open_clip_config.json and "
            f"open_clip_model.safetensors or open_clip_pytorch_model.bin, the layout of an open_clip repo on "
            f"the Hugging Face hub, e.g. https://huggingface.co/timm/vit_base_patch32_clip_224.openai)."
        ) from None


def _resolve_open_clip_weights(model_name, pretrained, cache_dir, local_files_only):
    """Returns (path or tag to hand open_clip, the tag's pretrained config or {}), or raises the one error."""
    import open_clip

    if pretrained is None:
        raise ValueError(
            f"ClipScorer({model_name!r}) needs pretrained weights (a tag such as 'openai' or a checkpoint path); "
            "scoring with a randomly initialized CLIP is never what an evaluation wants."
        )
    if Path(pretrained).is_file():
        return pretrained, {}
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        if _looks_like_path(pretrained):
            raise MissingWeightsError(
                f"CLIP model {model_name!r}: checkpoint file {pretrained} not found. Point pretrained at an "
                f"open_clip checkpoint (e.g. open_clip_pytorch_model.bin of "
                f"https://huggingface.co/timm/vit_base_patch32_clip_224.openai) or use a pretrained tag "
                f"({', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none known'})."
            ) from None
        raise ValueError(
            f"unknown open_clip pretrained tag {pretrained!r} for {model_name!r}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    hub = tag_cfg.get("hf_hub", "")
    where = f"https://huggingface.co/{hub.rstrip('/')}" if hub else tag_cfg.get("url", "?")
    how = (
        f"CLIP model {model_name!r} pretrained={pretrained!r}: weights are not available here (source: {where}). "
        f"Fetch them once with network, e.g. python -c \"import open_clip; "
        f"open_clip.create_model_and_transforms('{model_name}', pretrained='{pretrained}')\" (they land in the "
        f"Hugging Face cache), or download the checkpoint file and pass pretrained=<its path>."
    )
    try:
        if local_files_only and hub:
            from huggingface_hub import hf_hub_download

            repo, filename = os.path.split(hub)
            repo = repo.rstrip("/")
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            for name in names:
                try:
                    path = hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True)
                    return path, tag_cfg
                except Exception:
                    continue
            raise FileNotFoundError(hub)
        return open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir), tag_cfg
    except Exception:
        raise MissingWeightsError(how) from None


# ------------------------------------------------------------------------------------------------ DINO


def dino_transform():
    """DINO's evaluation preprocessing: resize 256 bicubic, center crop 224, ImageNet normalization."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class DinoScorer:
    """DINO similarity: 100 x cosine of the CLS tokens (after the final norm) of a DINO v1 ViT-S/16.

    ``backend="transformers"`` (default): ``ViTModel.from_pretrained(model)``, ``model`` a hub id
    (``facebook/dino-vits16``) or a local ``save_pretrained`` folder. ``backend="timm"``:
    ``timm.create_model(model, pretrained=True, num_classes=0)``, ``model`` a timm name
    (``vit_small_patch16_224.dino``), ``"hf-hub:..."`` or ``"local-dir:/path"`` (timm's hub layout).
    The preprocessing is :func:`dino_transform` for both, not the checkpoint's own processor config.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        backend: str = "transformers",
        device: str | torch.device = "cpu",
        local_files_only: bool = False,
        batch_size: int = 32,
    ) -> None:
        if backend not in DEFAULT_DINO_MODEL:
            raise ValueError(f"DINO backend must be one of {sorted(DEFAULT_DINO_MODEL)}, got {backend!r}")
        self.backend = backend
        self.model_id = str(model) if model is not None else DEFAULT_DINO_MODEL[backend]
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.transform = dino_transform()
        loader = {"transformers": _load_dino_transformers, "dinov2": _load_dinov2, "timm": _load_dino_timm}[backend]
        self.model = loader(self.model_id, local_files_only).to(self.device).eval().requires_grad_(False)

    @property
    def backbone(self) -> str:
        """What the tables name: the backend's architecture and the checkpoint."""
        kind = {"dinov2": "DINOv2", "transformers": "DINO v1", "timm": "DINO v1 (timm)"}[self.backend]
        return f"{kind} {self.model_id}"

    def _cls(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.backend in ("transformers", "dinov2"):  # last_hidden_state is after the final layer norm
            return self.model(pixel_values=pixels).last_hidden_state[:, 0]
        return self.model.forward_features(pixels)[:, 0]

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalized CLS tokens, [N, D] float32 on the CPU."""
        feats = []
        for chunk in _chunks(_rgb(images), self.batch_size):
            pixels = torch.stack([self.transform(im) for im in chunk]).to(self.device)
            feats.append(self._cls(pixels).float().cpu())
        return F.normalize(torch.cat(feats), dim=-1) if feats else torch.empty(0)

    def similarity(self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]) -> list[float]:
        """DINO score of each pair (images_a[i], images_b[i]): 100 x cosine of the CLS tokens."""
        _check_pairs(images_a, images_b)
        return _pairwise_cosine_x100(self.features(images_a), self.features(images_b))


def _dino_missing(model_id: str, backend: str, detail: str = "") -> MissingWeightsError:
    how = {
        "transformers": "with network run ViTModel.from_pretrained('facebook/dino-vits16') once (Hugging Face "
        "cache), or download https://huggingface.co/facebook/dino-vits16 (config.json + weights) to a folder "
        "and pass its path",
        "dinov2": "with network run Dinov2Model.from_pretrained('facebook/dinov2-small') once (Hugging Face "
        "cache), or download https://huggingface.co/facebook/dinov2-small (config.json + weights) to a folder "
        "and pass its path",
        "timm": "with network run timm.create_model('vit_small_patch16_224.dino', pretrained=True) once, or "
        "download https://huggingface.co/timm/vit_small_patch16_224.dino to a folder and pass "
        "'local-dir:<folder>'",
    }[backend]
    return MissingWeightsError(f"DINO model {model_id!r} ({backend}): weights not found{detail}. To get them: {how}.")


def _load_strict(cls, model_id: str, backend: str, local_files_only: bool, **kwargs):
    """``cls.from_pretrained`` that refuses a checkpoint with missing, unexpected or mismatched keys (transformers
    would fill them with random values and only log it)."""
    from transformers.utils import logging as hf_logging

    path = Path(model_id)
    if _looks_like_path(model_id):
        if not (path / "config.json").is_file() or not _has_transformers_weights(path):
            raise _dino_missing(model_id, backend, f" (no config.json + model weights in {path})") from None
    hint = {"transformers": "a DINOv2 checkpoint needs backend: dinov2",
            "dinov2": "a DINO v1 checkpoint needs backend: transformers"}.get(backend, "")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the mismatch is reported below, as an error
    try:
        model, info = cls.from_pretrained(model_id, local_files_only=local_files_only, output_loading_info=True, **kwargs)
    except OSError:
        raise _dino_missing(model_id, backend) from None
    except RuntimeError as err:  # transformers refuses tensors of other shapes before reporting the keys
        raise ValueError(f"DINO model {model_id!r} does not match {cls.__name__} (mismatched keys: tensors of other "
                         f"shapes: {str(err).splitlines()[0]}); {hint}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = {k: sorted(str(x) for x in info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        detail = "; ".join(f"{k.replace('_', ' ')}: {v[:4]}{' ...' if len(v) > 4 else ''}" for k, v in bad.items() if v)
        raise ValueError(f"DINO model {model_id!r} does not match {cls.__name__} ({detail}); its weights would be "
                         f"partly random. {hint}")
    return model


def _load_dino_transformers(model_id: str, local_files_only: bool):
    from transformers import ViTModel

    return _load_strict(ViTModel, model_id, "transformers", local_files_only, add_pooling_layer=False)


def _load_dinov2(model_id: str, local_files_only: bool):
    from transformers import Dinov2Model

    return _load_strict(Dinov2Model, model_id, "dinov2", local_files_only)


def _load_dino_timm(model_id: str, local_files_only: bool):
    import timm

    if model_id.startswith("local-dir:"):
        folder = Path(model_id.split(":", 1)[1])
        has_weights = any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))
        if not (folder / "config.json").is_file() or not has_weights:
            raise _dino_missing(model_id, "timm", f" (no config.json + model weights in {folder})") from None
    elif local_files_only:
        raise ValueError("local_files_only applies to the transformers backend; for timm use 'local-dir:<folder>'")
    try:
        return timm.create_model(model_id, pretrained=True, num_classes=0)
    except Exception as err:  # hub client errors vary with huggingface_hub versions
        if isinstance(err, RuntimeError) and "Unknown model" in str(err):
            raise
        raise _dino_missing(model_id, "timm") from None


# -------------------------------------------------------------------------------------------- DreamSim

# What `dreamsim.model.download_weights` checks in cache_dir (the contents of the package's release zips);
# each "<tag>lora" folder holds a peft adapter (adapter_config.json + adapter_model.safetensors or .bin).
DREAMSIM_FILES = {
    "ensemble": ["dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar", "clip_vitb16_pretrain.pth.tar",
                 "ensemble_lora"],
    "dino_vitb16": ["dino_vitb16_pretrain.pth", "dino_vitb16_single_lora"],
    "open_clip_vitb32": ["open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora"],
    "clip_vitb32": ["clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora"],
}
DREAMSIM_ZIPS = {
    t: f"https://github.com/ssundaram21/dreamsim/releases/download/v0.2.0-checkpoints/dreamsim_{t}_checkpoint.zip"
    for t in DREAMSIM_FILES
}
# The DINO ViT-B/16 backbone comes through torch.hub ('facebookresearch/dino:main', 'dino_vitb16') with the
# hub dir set to cache_dir: the repo's code in <cache_dir>/facebookresearch_dino_main/ and its weights in
# <cache_dir>/checkpoints/dino_vitbase16_pretrain.pth (what one online run leaves there).
_DREAMSIM_WITH_DINO = ("ensemble", "dino_vitb16")
DINO_HUB_REPO = "facebookresearch/dino:main"
DINO_HUB_REPO_DIR = "facebookresearch_dino_main"
DINO_HUB_CHECKPOINT = "checkpoints/dino_vitbase16_pretrain.pth"
DINO_HUB_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"


def dreamsim_missing_files(cache_dir: str | os.PathLike, dreamsim_type: str = DEFAULT_DREAMSIM_TYPE) -> list[str]:
    """The files DreamSim of this type needs in cache_dir that are not there (empty list: all present)."""
    root = Path(cache_dir)
    missing = []
    for name in DREAMSIM_FILES[dreamsim_type]:
        if name.endswith("_lora"):
            adapter = root / name
            if not (adapter / "adapter_config.json").is_file():
                missing.append(f"{name}/adapter_config.json")
            if not any((adapter / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
                missing.append(f"{name}/adapter_model.safetensors")
        elif not (root / name).is_file():
            missing.append(name)
    if dreamsim_type in _DREAMSIM_WITH_DINO and not (root / DINO_HUB_CHECKPOINT).is_file():
        missing.append(DINO_HUB_CHECKPOINT)
    return missing


@contextlib.contextmanager
def dino_hub_redirect(cache_dir: str | os.PathLike):
    """While active, dreamsim's ``torch.hub.load('facebookresearch/dino:main', 'dino_vitb16')`` works offline.

    If torch.hub's copy of the DINO repo is in cache_dir (``facebookresearch_dino_main/``), the real
    torch.hub path runs untouched (it uses a cached repo without network). Otherwise the model is built
    with the copy of DINO's ``vision_transformer.py`` that dreamsim ships (``vit_base(patch_size=16,
    num_classes=0)``, exactly DINO's hubconf) and loaded strictly from
    ``<cache_dir>/checkpoints/dino_vitbase16_pretrain.pth``, the file DINO's hubconf would have downloaded.
    Restores ``torch.hub.load`` and the hub dir (dreamsim sets it to cache_dir) on exit.
    """
    cache_dir = Path(cache_dir)
    real_load = torch.hub.load
    hub_dir = torch.hub.get_dir()

    def load(repo_or_dir, model, *args, **kwargs):
        if repo_or_dir == DINO_HUB_REPO and model == "dino_vitb16" and not (cache_dir / DINO_HUB_REPO_DIR).is_dir():
            from dreamsim.feature_extraction.vision_transformer import vit_base

            net = vit_base(patch_size=16, num_classes=0)
            state = torch.load(cache_dir / DINO_HUB_CHECKPOINT, map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
            return net
        return real_load(repo_or_dir, model, *args, **kwargs)

    torch.hub.load = load
    try:
        yield
    finally:
        torch.hub.load = real_load
        torch.hub.set_dir(hub_dir)


class DreamSimScorer:
    """DreamSim: 100 x (1 - the package's distance), with the package's own model and preprocessing.

    Loads ``dreamsim.dreamsim(pretrained=True, dreamsim_type=..., cache_dir=...)`` from files already in
    ``cache_dir`` (see :data:`DREAMSIM_FILES`; for DINO backbones also the torch.hub files, see
    :func:`dino_hub_redirect`): a missing file raises :class:`MissingWeightsError` before the package would
    try to download. Types: ``"ensemble"`` (DINO + CLIP + OpenCLIP ViT-B/16, the default), ``"dino_vitb16"``,
    ``"clip_vitb32"``, ``"open_clip_vitb32"``. ``normalize_embeds=True`` is the package's default.
    """

    def __init__(
        self,
        dreamsim_type: str = DEFAULT_DREAMSIM_TYPE,
        cache_dir: str | os.PathLike = "./models",
        device: str | torch.device = "cpu",
        normalize_embeds: bool = True,
        batch_size: int = 16,
    ) -> None:
        if dreamsim_type not in DREAMSIM_FILES:
            raise ValueError(
                f"dreamsim_type {dreamsim_type!r} is not supported here; use one of {sorted(DREAMSIM_FILES)} "
                "(the DINOv2 / SynCLR types need torch.hub repositories this harness does not resolve offline)"
            )
        self.dreamsim_type = dreamsim_type
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device)
        self.batch_size = batch_size
        missing = dreamsim_missing_files(self.cache_dir, dreamsim_type)
        if missing:
            how = f"run dreamsim.dreamsim(pretrained=True, dreamsim_type='{dreamsim_type}', cache_dir='{self.cache_dir}')"
            how += f" once with network (it unzips {DREAMSIM_ZIPS[dreamsim_type]} there"
            how += f" and torch.hub fetches {DINO_HUB_URL} into checkpoints/)" if DINO_HUB_CHECKPOINT in missing else ")"
            raise MissingWeightsError(
                f"DreamSim model {dreamsim_type!r}: missing in {self.cache_dir}: {', '.join(missing)}. To get them: {how}."
            ) from None
        from dreamsim import dreamsim

        # the package prints "Using cached ..." on every load, and peft warns about the adapter the package
        # itself wraps twice (get_peft_model, then PeftModel.from_pretrained): both are noise here
        with (
            open(os.devnull, "w") as devnull,
            dino_hub_redirect(self.cache_dir),
            contextlib.redirect_stdout(devnull),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
            model, preprocess = dreamsim(
                pretrained=True,
                device=str(self.device),
                cache_dir=str(self.cache_dir),
                normalize_embeds=normalize_embeds,
                dreamsim_type=dreamsim_type,
            )
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.preprocess = preprocess  # PIL -> [1, 3, 224, 224] in [0, 1]

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The package's preprocessing of each image, stacked: [N, 3, 224, 224] in [0, 1]."""
        return torch.cat([self.preprocess(im) for im in _rgb(images)])

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """DreamSim embeddings (the package's ``embed``), [N, D] float32 on the CPU."""
        feats = []
        for chunk in _chunks(list(images), self.batch_size):
            feats.append(self.model.embed(self.pixels(chunk).to(self.device)).float().cpu())
        return torch.cat(feats) if feats else torch.empty(0)

    def distance(self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]) -> list[float]:
        """The package's distance of each pair, 1 - cosine of the embeddings (as its ``forward``)."""
        _check_pairs(images_a, images_b)
        fa, fb = self.embed(images_a), self.embed(images_b)
        return (1 - F.cosine_similarity(fa.double(), fb.double(), dim=-1)).tolist()

    def similarity(self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]) -> list[float]:
        """DreamSim score of each pair: 100 x (1 - distance)."""
        return [100.0 * (1.0 - d) for d in self.distance(images_a, images_b)]
