"""An offline CLIP byte-level BPE tokenizer for tiny test/demo models.

Real checkpoints ship their tokenizer; tiny models built from configs need one that loads through
``CLIPTokenizer.from_pretrained(dir)`` exactly like a real one, without touching a hub. We write a
``vocab.json`` + ``merges.txt`` from a small word list: the 256 byte-level symbols (and their ``</w>``
end-of-word forms), then merges that build every listed word into one token.

    >>> write_clip_tokenizer(tmp_dir, words=["red", "circle"])   # doctest: +SKIP
    >>> CLIPTokenizer.from_pretrained(tmp_dir)("a red circle").input_ids  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

#: Words that get a single token; chosen to cover the demo/toy-world captions. Everything else still
#: tokenizes (byte fallback), only into more tokens.
DEFAULT_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "image",
    "photo",
    "style",
    "art",
    "picture",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "cyan",
    "pink",
    "white",
    "black",
    "gray",
    "circle",
    "square",
    "triangle",
    "shape",
    "background",
    "cartoon",
    "disney",
    "animated",
    "pixel",
    "realistic",
    "outline",
    "thick",
    "dark",
    "light",
    "plain",
    "small",
    "large",
    "cat",
    "dog",
    "house",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode mapping (the standard reversible byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def _word_merges(word: str, byte_map: dict[int, str]) -> list[tuple[str, str]]:
    """Left-to-right merges that turn ``word`` (with its ``</w>`` marker) into a single symbol."""
    symbols = [byte_map[b] for b in word.encode("utf-8")]
    symbols[-1] = symbols[-1] + "</w>"
    merges = []
    current = symbols[0]
    for sym in symbols[1:]:
        merges.append((current, sym))
        current = current + sym
    return merges


def write_clip_tokenizer(
    directory: str | Path, *, words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` loadable by ``CLIPTokenizer``.

    The vocabulary is ``256 bytes + 256 bytes</w> + one token per merge + BOS + EOS``; with the default
    word list it stays under 1000 entries (the tiny CLIP text encoders' ``vocab_size``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_map = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for ch in byte_map.values():
        vocab.setdefault(ch, len(vocab))
    for ch in byte_map.values():
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        for pair in _word_merges(word.lower(), byte_map):
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return directory


def vocab_size(directory: str | Path) -> int:
    """Number of entries in a written vocabulary."""
    return len(json.loads((Path(directory) / "vocab.json").read_text()))
