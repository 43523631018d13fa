"""CLIP-based scorers (CLIP score, PickScore, LAION aesthetic) and a tiny random CLIP for offline tests.

Registered by name in :mod:`pipelines.rewards` (``clip``, ``pickscore``, ``aesthetic``). Models load only from
local directories (``local_files_only=True``); nothing is downloaded. transformers is imported only when a model
is built, so importing this module stays cheap.

Example::

    from pipelines.clip_scorers import ClipScorer, make_tiny_clip
    clip_dir = make_tiny_clip("/tmp/tiny_clip")            # random tiny CLIP for tests
    scores = ClipScorer(clip_dir).score(images, prompts)    # (N,) float32
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image
from torch import nn

from pipelines.scoring import check_inputs

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

logger = logging.getLogger(__name__)

DTypeName = Literal["float32", "bfloat16", "float16"]
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be a torch.dtype or one of {list(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _require_dir(path: str | Path | None, param: str, what: str, needs: Sequence[str] = ()) -> Path:
    """Return ``path`` as a Path if it is an existing directory holding any of ``needs``; else FileNotFoundError."""
    hint = f"pass {param}=<local directory holding {what}>"
    if path is None:
        raise FileNotFoundError(f"{param} is required: {hint}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{param}={str(path)!r} is not a directory: {hint} (nothing is downloaded)")
    if needs and not any((p / n).exists() for n in needs):
        raise FileNotFoundError(f"{param}={str(path)!r} holds none of {list(needs)}: {hint}")
    return p


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


_MODEL_FILES = ("config.json",)
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _pooled(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x and a ModelOutput (projected pooler_output) in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder:
    """A ``CLIPModel`` + ``CLIPProcessor`` loaded from local directories, producing L2-normalised embeddings.

    Args:
        model_dir: directory with the CLIPModel checkpoint (config.json + weights).
        processor_dir: directory with the processor (image processor + tokenizer); defaults to ``model_dir``.
        device, dtype: where/how the model runs; embeddings are returned as float32 on CPU.
        batch_size: images (or prompts) per forward pass; results do not depend on it.
    """

    def __init__(
        self,
        model_dir: str | Path,
        processor_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | DTypeName = torch.float32,
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        model_path = _require_dir(
            model_dir, "model_dir", "a CLIPModel checkpoint (config.json + weights)", _MODEL_FILES
        )
        proc_what = "a CLIP processor (preprocessor_config.json + tokenizer files)"
        if processor_dir is None and not any((model_path / n).exists() for n in _PROCESSOR_FILES):
            raise FileNotFoundError(
                f"model_dir={str(model_dir)!r} holds no processor files ({list(_PROCESSOR_FILES)}): pass "
                f"processor_dir=<local directory holding {proc_what}; for PickScore_v1 a copy of "
                "laion/CLIP-ViT-H-14-laion2B-s32B-b79K>"
            )
        proc_path = _require_dir(processor_dir or model_path, "processor_dir", proc_what, _PROCESSOR_FILES)
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype)
        self.batch_size = batch_size
        self.model: CLIPModel = CLIPModel.from_pretrained(model_path, local_files_only=True)
        self._logit_scale = self.model.logit_scale.detach().float().exp().cpu()  # before any cast to bf16
        self.model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.processor: CLIPProcessor = CLIPProcessor.from_pretrained(proc_path, local_files_only=True)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        logger.info(
            "loaded CLIP from %s (processor %s) on %s/%s", model_path, proc_path, self.device, self.dtype
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` as a float32 scalar tensor, read in float32 at load (100 for trained CLIP)."""
        return self._logit_scale

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float32 unit-norm projected image embeddings."""
        out = []
        for sl in _batches(len(images), self.batch_size):
            rgb = [im.convert("RGB") for im in images[sl]]
            pixels = self.processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
            feats = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            out.append(nn.functional.normalize(feats.float(), dim=-1).cpu())  # (b, D)
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.inference_mode()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 unit-norm projected text embeddings (prompts padded/truncated to the model's 77 tokens)."""
        out = []
        for sl in _batches(len(prompts), self.batch_size):
            tokens = self.processor.tokenizer(
                list(prompts[sl]),
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            feats = _pooled(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            )
            out.append(nn.functional.normalize(feats.float(), dim=-1).cpu())  # (b, D)
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    def cosine(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """(N,) float32 ``cos(image_i, prompt_i)``."""
        check_inputs(images, prompts)
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(dim=-1)


class ClipScorer:
    """CLIP score ``scale * cos(E_I(image), E_T(prompt))``, default scale 100.

    torchmetrics' ``CLIPScore`` is ``100 * max(cos, 0)``; here the clamp is off by default (``clamp_negative=False``)
    so that the score keeps ranking pairs whose cosine is negative (common with small or random models, never with
    trained CLIP on matching captions, where both agree). Pass ``clamp_negative=True`` for torchmetrics' exact value.
    """

    name = "clip"

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | DTypeName = torch.float32,
        batch_size: int = 16,
        scale: float = 100.0,
        clamp_negative: bool = False,
        processor_dir: str | Path | None = None,
    ) -> None:
        self.embedder = ClipEmbedder(model_dir, processor_dir, device, dtype, batch_size)
        self.scale = float(scale)
        self.clamp_negative = clamp_negative

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """(N,) float32."""
        cos = self.embedder.cosine(images, prompts)
        if self.clamp_negative:
            cos = cos.clamp_min(0.0)
        return self.scale * cos


class PickScoreScorer:
    """PickScore ``exp(logit_scale) * cos(E_I(image), E_T(prompt))`` (the diagonal of CLIP's ``logits_per_image``).

    Args:
        model_dir: local copy of ``yuvalkirstain/PickScore_v1`` (a fine-tuned CLIP-H/14; exp(logit_scale) ~ 100).
        processor_dir: local copy of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (its processor); defaults to
            ``model_dir`` when that holds processor files too.
    """

    name = "pickscore"

    def __init__(
        self,
        model_dir: str | Path,
        processor_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | DTypeName = torch.float32,
        batch_size: int = 16,
    ) -> None:
        self.embedder = ClipEmbedder(model_dir, processor_dir, device, dtype, batch_size)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """(N,) float32."""
        return self.embedder.logit_scale * self.embedder.cosine(images, prompts)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP on a ``dim``-d CLIP image embedding -> (N,) score.

    ``Linear(dim, 1024) -> Dropout(0.2) -> Linear(1024, 128) -> Dropout(0.2) -> Linear(128, 64) -> Dropout(0.1)
    -> Linear(64, 16) -> Linear(16, 1)``. There are no activations (the original has them commented out), so in
    eval mode the head is one affine map. State-dict keys ``layers.{0,2,4,6,7}.{weight,bias}`` match the released
    ``sac+logos+ava1-l14-linearMSE.pth`` (dim 768, CLIP ViT-L/14).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(N, dim) -> (N,)."""
        return self.layers(emb).squeeze(-1)


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """Load an ``AestheticHead`` (eval mode) from a ``.safetensors`` or torch ``.pt/.pth`` state dict."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"head_path={str(path)!r} is not a file: pass head_path=<aesthetic MLP state dict (.safetensors or .pth), "
            "e.g. sac+logos+ava1-l14-linearMSE.pth>"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(p)
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    if "layers.0.weight" not in state:
        raise ValueError(
            f"{p} is not an aesthetic head state dict (no 'layers.0.weight'; keys: {sorted(state)[:8]})"
        )
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{p} does not match the AestheticHead architecture: {e}") from e
    return head.eval()


def save_random_aesthetic_head(path: str | Path, dim: int, seed: int = 0) -> Path:
    """Save a randomly initialised ``AestheticHead(dim)`` (for tests) as safetensors or ``.pt``; return the path."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead(dim)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, p)
    else:
        torch.save(state, p)
    return p


class AestheticScorer:
    """LAION aesthetic score: ``AestheticHead(normalize(E_I(image)))``. Prompts are ignored.

    Args:
        clip_dir: local CLIP checkpoint + processor (``openai/clip-vit-large-patch14`` for the released head).
        head_path: the head's state dict; its input dim must equal the CLIP projection dim.
    """

    name = "aesthetic"

    def __init__(
        self,
        clip_dir: str | Path,
        head_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | DTypeName = torch.float32,
        batch_size: int = 16,
    ) -> None:
        self.head = load_aesthetic_head(head_path)
        self.embedder = ClipEmbedder(clip_dir, None, device, dtype, batch_size)
        proj = int(self.embedder.model.config.projection_dim)
        if self.head.dim != proj:
            raise ValueError(
                f"aesthetic head expects {self.head.dim}-d embeddings but the CLIP at {clip_dir} gives {proj}"
            )

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(N,) float32."""
        check_inputs(images, prompts)
        return self.head(self.embedder.embed_images(images)).float()  # (N, D) -> (N,)


# ----------------------------------------------------------------------------------------------------------------
# Tiny random CLIP (tests / demo; never downloaded)
# ----------------------------------------------------------------------------------------------------------------

_TINY_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("c", "a"),
    ("ca", "t</w>"),
    ("d", "o"),
    ("do", "g</w>"),
    ("r", "e"),
    ("re", "d</w>"),
    ("o", "f</w>"),
    ("p", "h"),
)


def _byte_unicode() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses for bytes 0..255 (index = byte value).

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) to ``chr(256 + k)`` in order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def write_tiny_clip_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """Write a small CLIP BPE vocab (``vocab.json`` + ``merges.txt``) into ``out_dir`` and return the tokenizer.

    Vocab: 256 byte characters, their 256 ``</w>`` (end-of-word) forms, one token per merge in ``_TINY_MERGES``,
    then ``<|startoftext|>`` and ``<|endoftext|>`` (the same order as OpenAI's vocab): 526 tokens. Any text
    tokenizes (unmerged words fall back to byte characters).
    """
    from transformers import CLIPTokenizer

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in _TINY_MERGES)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges = "\n".join(f"{a} {b}" for a, b in _TINY_MERGES)
    (d / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(d, local_files_only=True)


def make_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``CLIPModel`` + ``CLIPProcessor`` to ``out_dir``; return the directory.

    Text tower: hidden 32, 2 layers, 4 heads, 77 positions, the 526-token vocab of ``write_tiny_clip_tokenizer``.
    Vision tower: 32x32 images, 8x8 patches, hidden 32, 2 layers, 4 heads. Projection dim 16. Image processor:
    resize shortest edge to 32, centre-crop 32x32, OpenAI CLIP mean/std (PIL backend; torchvision not needed).
    ``CLIPModel/CLIPProcessor.from_pretrained(out_dir, local_files_only=True)`` load it. Does not touch the global
    torch RNG.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    d = Path(out_dir)
    tokenizer = write_tiny_clip_tokenizer(d)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(d)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    logger.info("saved tiny CLIP (seed %d) to %s", seed, d)
    return d
