"""The shipped toy base: a trained tiny SD3 pipeline committed under ``pipelines/assets/toy_base`` with a manifest.

Quality of the shipped build (8 held-out prompts x 32 seeds, ``pipelines.toy_sampling.EVAL_SETTINGS``: 20 steps,
guidance 1.0): colour accuracy 0.965, shape accuracy 0.875, plain-prompt outline rate 0.164, style-prompt
outline rate 1.0 (the bar: colour >= 0.90, shape >= 0.85, outline 0.15-0.35; ``python -m benchmarks.toy_style
--base-only`` remeasures it). Built in 27.4 min with one torch thread on a 2-core machine that was running a
benchmark on its other core.

The directory holds what ``StableDiffusion3Pipeline.save_pretrained`` writes (safetensors weights, configs,
tokenizers), ``toy_base.json`` (the full :class:`pipelines.toy_base.ToyBaseConfig`, the seed, timings and
losses of the build) and ``manifest.json``: the sha256 of every other file and the command that rebuilds the
directory. ``model.pretrained=toy-base`` uses this directory after :func:`verify_manifest` (a file whose bytes
changed, or that is missing, is a :class:`ManifestError` naming it); ``model.pretrained=toy-base:rebuild`` trains
a fresh base into ``<workdir>/base_model`` with the same recipe instead.

Rebuild the shipped copy (each committed rebuild adds its ~3 MB to the repository history, so rebuild only when
the recipe changes; ``toy_base.json`` records how long the shipped build took)::

    python -m pipelines.toy_base build pipelines/assets/toy_base --seed 0
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from prefopt_core.config import ConfigError

logger = logging.getLogger(__name__)

#: Where the shipped base lives (inside the ``pipelines`` package, so it is installed as package data).
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "toy_base"
MANIFEST = "manifest.json"
#: The command that rebuilds the shipped base (``{out}`` is the target directory).
REBUILD_COMMAND = "python -m pipelines.toy_base build {out} --seed {seed}"


class ManifestError(ConfigError):
    """A shipped pipeline file is missing or its sha256 differs from the manifest's."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _payload_files(directory: Path) -> list[str]:
    """Every file under ``directory`` except the manifest, as sorted POSIX paths relative to it."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def _shown(directory: Path) -> str:
    """``directory`` relative to the repository root when it lies inside it (the shipped base), else as is."""
    root = SHIPPED_DIR.parents[2]
    try:
        return directory.resolve().relative_to(root).as_posix()
    except ValueError:
        return directory.as_posix()


def write_manifest(directory: str | Path, seed: int) -> Path:
    """Write ``directory/manifest.json``: ``{"files": {relpath: sha256}, "rebuild": command}``; return its path."""
    directory = Path(directory)
    files = {rel: sha256_file(directory / rel) for rel in _payload_files(directory)}
    manifest = {"files": files, "rebuild": REBUILD_COMMAND.format(out=_shown(directory), seed=seed)}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def verify_manifest(directory: str | Path) -> Path:
    """Check every file the manifest lists against its sha256; return ``directory``.

    Raises :class:`ManifestError` naming the first file that is missing or differs (and the rebuild command),
    or saying that the manifest itself is missing. Files the manifest does not list are ignored.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(
            f"the toy base at {directory} has no {MANIFEST}; rebuild it with "
            f"`{REBUILD_COMMAND.format(out=directory, seed=0)}`"
        )
    manifest = json.loads(path.read_text())
    for rel, expected in sorted(manifest["files"].items()):
        file = directory / rel
        if not file.is_file():
            raise ManifestError(
                f"toy base file {file} is missing (listed in {path}); "
                f"restore it from git or rebuild with `{manifest['rebuild']}`"
            )
        if sha256_file(file) != expected:
            raise ManifestError(
                f"toy base file {file} does not match its sha256 in {path}; "
                f"restore it from git or rebuild with `{manifest['rebuild']}`"
            )
    return directory


def shipped_base() -> Path:
    """The verified shipped toy base directory (see :func:`verify_manifest`)."""
    return verify_manifest(SHIPPED_DIR)
