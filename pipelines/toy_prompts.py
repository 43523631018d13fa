"""The toy world's captions and the base model's training distribution: captions, the style prior, held-out prompts.

Built on :mod:`pipelines.toy_world` (one coloured shape on a light background; the "cartoon" style is a thick
dark outline). A training example is drawn as follows (``ToyWorldSpec`` holds the numbers):

- content: a (colour, shape) combination drawn uniformly from ``ALL_COMBOS`` (all but
  ``HELDOUT_COMBOS`` if ``include_heldout`` is False);
- with probability ``style_caption_prob`` (0.3) the caption is the *style* caption
  ``"disney style. a {color} {shape}"`` and the image is **always** outlined;
- otherwise the caption is the *plain* caption ``"a {color} {shape}"`` and the image is outlined with
  probability ``p_style`` (0.25): the base's prior style rate, the room the preference training has to move;
- a plain-caption example has its caption replaced by ``""`` with probability ``uncond_prob`` (0.1), so the
  model learns an unconditional branch for classifier-free guidance. Only plain examples are dropped, so
  ``""`` means "any content, in the prior style" and CFG on a plain prompt does not push the style rate
  away from ``p_style`` (dropping style examples too would make ``""`` more outlined than a plain prompt,
  and CFG would then suppress the style below the prior).

Held-out prompts: 8 of the 24 colour x shape combinations (one per colour, shapes cycling, so every colour and
every shape also occurs among the others) are held out of the *preference* stage, and 4 more are validation
prompts (hyperparameter sweeps only): the testbed regenerates its preference pairs from ``train_prompts()`` (the
other 12, still covering every colour and shape), sweeps on ``validation_prompts()`` and evaluates on
``heldout_prompts()``, so the style preference must generalise to prompts it was never trained on. The base itself trains on all 24 combinations
(``ToyWorldSpec.include_heldout=True``), as a real base model has seen every kind of content: with frozen random
text encoders the base does not compose unseen colour x shape pairs (measured: colour accuracy 0.42 on held-out
pairs vs 0.70 on seen ones after 1500 and 3000 steps), so holding them out of the base would make the
evaluation prompts render badly. ``include_heldout=False`` gives that stricter variant (held-out pairs never seen,
plain or styled).

    >>> heldout_prompts()[:3]
    ['a red circle', 'a green square', 'a blue triangle']
    >>> style_prompt("a red circle")
    'disney style. a red circle'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.toy_world import SHAPES, TOY_COLORS, draw_toy_image, plain_prompt

#: The style phrase prefixed to a content caption to ask for the outline style (MaPO's cartoon preset prefixes
#: "Disney style animated image."). Each of its words is one token of the offline CLIP tokenizer ("cartoon" and
#: "animated" are not, with the current merges), so the longest style caption is 15 tokens and fits the base's
#: 16-token CLIP and T5 windows untruncated.
STYLE_PHRASE = "disney style."
#: ``regenerate`` template of the chosen (styled) prompt; ``{prompt}`` is a plain caption.
STYLE_TEMPLATE = STYLE_PHRASE + " {prompt}"

COLOR_NAMES: tuple[str, ...] = tuple(TOY_COLORS)
#: (colour, shape) combinations held out of preference training (evaluation prompts): colour i, shape i mod 3.
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOR_NAMES)
)
ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)
#: (colour, shape) combinations for choosing hyperparameters (neither preference-training nor held-out):
#: colour i, shape (i + 1) mod 3, for the first four colours.
VALIDATION_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (c, SHAPES[(i + 1) % len(SHAPES)]) for i, c in enumerate(COLOR_NAMES[:4])
)
#: The combinations the preference stage trains on (and the base always sees).
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(
    c for c in ALL_COMBOS if c not in HELDOUT_COMBOS and c not in VALIDATION_COMBOS
)


def style_prompt(prompt: str) -> str:
    """The style caption of a plain caption: ``"disney style. " + prompt``."""
    return STYLE_TEMPLATE.format(prompt=prompt)


def train_prompts() -> list[str]:
    """The 12 plain captions of the preference-training combinations (colour-major order)."""
    return [plain_prompt(c, s) for c, s in TRAIN_COMBOS]


def validation_prompts() -> list[str]:
    """The 4 plain captions of the validation combinations (hyperparameter sweeps only)."""
    return [plain_prompt(c, s) for c, s in VALIDATION_COMBOS]


def heldout_prompts() -> list[str]:
    """The 8 plain captions of the held-out (evaluation) combinations."""
    return [plain_prompt(c, s) for c, s in HELDOUT_COMBOS]


def _named(prompt: str, names: Sequence[str], what: str) -> str:
    """The first word of ``prompt`` (split on spaces, commas and full stops) that is one of ``names``."""
    for word in prompt.replace(".", " ").replace(",", " ").lower().split():
        if word in names:
            return word
    raise ValueError(f"no toy {what} in prompt {prompt!r}; {what}s: {', '.join(names)}")


def prompt_color(prompt: str) -> str:
    """The colour named in a caption (plain, style or any phrasing, e.g. ``"a red circle on a light
    background"``); ValueError naming the valid colours if it names none."""
    return _named(prompt, COLOR_NAMES, "colour")


def prompt_shape(prompt: str) -> str:
    """The shape named in a caption; ValueError naming the valid shapes if it names none."""
    return _named(prompt, SHAPES, "shape")


@dataclass(frozen=True)
class ToyWorldSpec:
    """The base's training distribution (see the module docstring)."""

    p_style: float = 0.25
    style_caption_prob: float = 0.3
    uncond_prob: float = 0.1
    size: int = 32
    include_heldout: bool = True
    upright: bool = False  # squares axis-aligned, triangles pointing up (``draw_toy_image(upright=True)``)

    @property
    def combos(self) -> tuple[tuple[str, str], ...]:
        """The (colour, shape) combinations the base trains on."""
        return ALL_COMBOS if self.include_heldout else tuple(c for c in ALL_COMBOS if c not in HELDOUT_COMBOS)

    def __post_init__(self) -> None:
        for name in ("p_style", "style_caption_prob", "uncond_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class WorldExample:
    """One training example: image, caption ("" for unconditional) and whether it is outlined."""

    image: Image.Image
    caption: str
    outline: bool
    color: str
    shape: str


def sample_example(rng: np.random.Generator, spec: ToyWorldSpec) -> WorldExample:
    """Draw one training example of the base's world (``rng`` is the only randomness)."""
    color, shape = spec.combos[int(rng.integers(len(spec.combos)))]
    styled = bool(rng.random() < spec.style_caption_prob)
    outline = styled or bool(rng.random() < spec.p_style)
    caption = plain_prompt(color, shape)
    if styled:
        caption = style_prompt(caption)
    elif rng.random() < spec.uncond_prob:
        caption = ""
    image = draw_toy_image(shape, TOY_COLORS[color], outline, spec.size, rng, spec.upright)  # type: ignore[arg-type]
    return WorldExample(image=image, caption=caption, outline=outline, color=color, shape=shape)


def sample_dataset(n: int, spec: ToyWorldSpec, seed: int) -> list[WorldExample]:
    """``n`` examples drawn from ``np.random.default_rng(seed)``; same seed, same list."""
    rng = np.random.default_rng(seed)
    return [sample_example(rng, spec) for _ in range(n)]
