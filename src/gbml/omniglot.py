"""Omniglot (Lake et al. 2015): few-shot classification tasks from handwritten characters.

The data set has 1623 characters from 50 alphabets, 20 drawings of each, as 105×105 one-bit
PNGs in two zips: ``images_background.zip`` (964 characters, 30 alphabets) and
``images_evaluation.zip`` (659 characters, 20 alphabets).

**Where the zips are found.** A *data folder* is a folder holding ``omniglot/images_background.zip``
and ``omniglot/images_evaluation.zip``. Each zip is looked up in, in this order: the folder named
by the environment variable ``GBML_DATA_DIR``, the ``root`` argument, and the cache folder
(``cache_dir`` argument, else ``$GBML_CACHE_DIR``, else ``~/.cache/gbml``). Missing zips are
downloaded (with ``download=True``) from the brendenlake/omniglot GitHub repository into the cache
folder. Nothing is ever written into the other folders, which may be read-only.

**What is cached.** The first load checks the zips' content (layout, counts, every PNG decodes),
shrinks every drawing to 28×28 and saves the result as one file in the cache folder,
``<cache>/omniglot/omniglot-28px-v1-<fingerprint>.pt``: a ``torch.save``'d dict with

- ``images``: uint8 tensor (1623, 20, 28, 28), stroke intensity 0 (background) … 255 (stroke);
- ``names``: the 1623 character names ``"<alphabet>/<characterNN>"``.

Characters are in a fixed order: the background zip's first, then the evaluation zip's, each
sorted by alphabet folder name and then character folder name (Python string order, i.e. by code
point); a character's 20 drawings are sorted by file name. The fingerprint hashes the zips'
member names, sizes and CRC-32s (read from the zips' directories, which is fast), so a changed
source builds a new file while a re-packed zip with the same content reuses the old one. Later
loads read that one file.

**Preprocessing.** Each one-bit image is converted to 8-bit grey *before* resizing, then resized
with Pillow's LANCZOS filter, i.e. antialiased: thin strokes become grey instead of vanishing or
aliasing. (The MAML authors' script calls LANCZOS on the one-bit image directly, which Pillow
silently turns into nearest-neighbour sampling for mode-"1" images.) Finally the image is
inverted, so strokes are bright (≈1 after dividing by 255) on a 0 background.

**Protocol.** A fixed permutation of the 1623 characters (seed :data:`SPLIT_SEED`) puts the first
1200 in meta-training and the other 423 in meta-testing (``"test"``); meta-training is further cut
into 1100 ``"train"`` and 100 ``"val"`` characters for periodic validation (``"trainval"`` is all
1200). With ``rotations=True`` each character at 0°, 90°, 180° and 270° is a class of its own
(Santoro et al. 2016; Finn et al. 2017), so ``"train"`` has 4400 classes.

**The miniature.** gbml ships 50 real characters, the first of each alphabet with all 20
drawings, in the same two-zip layout (``gbml/data/omniglot-mini``, 424 KiB):
:func:`load_omniglot_miniature` reads them with the same checks and preprocessing, without a
data folder, a cache or a network. Its splits cut the same fractions of its own permutation
(34 train, 3 val, 13 test characters; see :func:`omniglot_split`). It is for tests and for trying
the code offline: its accuracies are not comparable with the papers'.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import random
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import torch
from PIL import Image, ImageOps
from torch import Tensor

from gbml.errors import CorruptDataError, MissingDataError, check_positive_integer
from gbml.tasks import Task, TaskFamily, check_counts

DATA_DIR_ENV = "GBML_DATA_DIR"
CACHE_DIR_ENV = "GBML_CACHE_DIR"
URL_BASE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
#: Each zip's top folder and its number of characters, in the order they are stored.
ZIP_CHARACTERS = {"images_background": 964, "images_evaluation": 659}
NUM_CHARACTERS = 1623
#: The miniature shipped with gbml: the first character of each alphabet (30 + 20).
MINIATURE_DIR = Path(__file__).resolve().parent / "data" / "omniglot-mini"
MINIATURE_CHARACTERS = {"images_background": 30, "images_evaluation": 20}
DRAWINGS = 20
SOURCE_SIZE = 105
IMAGE_SIZE = 28
#: Seed of the character permutation that defines the splits (see :func:`omniglot_split`).
SPLIT_SEED = 0
#: Each split's slice of the permutation of the full data set's 1623 characters.
SPLITS = {
    "train": slice(0, 1100),
    "val": slice(1100, 1200),
    "trainval": slice(0, 1200),
    "test": slice(1200, NUM_CHARACTERS),
}
ROTATIONS = 4
# Bump when the preprocessing changes, so that old cache files are not reused.
_CACHE_VERSION = 1


class Omniglot:
    """The whole preprocessed data set, as returned by :func:`load_omniglot` (or the miniature,
    by :func:`load_omniglot_miniature`).

    ``images`` is a uint8 tensor (C, 20, 28, 28), 0 background … 255 stroke, with C = 1623
    (50 for the miniature); ``names[c]`` is character ``c``'s ``"<alphabet>/<characterNN>"``.
    The order is described in the module docstring.
    """

    def __init__(self, images: Tensor, names: list[str] | tuple[str, ...]) -> None:
        expected = ("C", DRAWINGS, IMAGE_SIZE, IMAGE_SIZE)
        if (
            not isinstance(images, Tensor)
            or images.dtype != torch.uint8
            or images.dim() != 4
            or tuple(images.shape[1:]) != expected[1:]
            or len(images) < 1
        ):
            what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images)
            raise ValueError(f"Omniglot images must be a uint8 tensor of shape {expected}, got {what}")
        if len(names) != len(images):
            raise ValueError(f"expected {len(images)} character names (one per character), got {len(names)}")
        self.images = images
        self.names = tuple(names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"Omniglot({len(self)} characters × {DRAWINGS} drawings, {IMAGE_SIZE}×{IMAGE_SIZE} uint8)"


# --------------------------------------------------------------------------------------------------
# Splits


@functools.cache
def _permutation(num_characters: int) -> tuple[int, ...]:
    # Fisher–Yates driven by random.Random(seed).random(): Python guarantees that sequence for a
    # given seed across versions and machines (unlike random.shuffle or torch.randperm, whose
    # algorithms may change), so the splits are the same everywhere.
    rng = random.Random(SPLIT_SEED)
    order = list(range(num_characters))
    for i in range(num_characters - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return tuple(order)


def omniglot_split(split: str, num_characters: int = NUM_CHARACTERS) -> list[int]:
    """The (sorted) character indices of a split: ``"train"`` (1100), ``"val"`` (100),
    ``"trainval"`` (their 1200) or ``"test"`` (423).

    The splits are consecutive slices of a permutation of all 1623 characters fixed by
    :data:`SPLIT_SEED`, so they are disjoint and identical on every machine. For a data set of
    another size (the miniature: ``num_characters=50``) the permutation is of its characters and
    each boundary scales with the size, rounded: 34 train, 3 val and 13 test characters of 50.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; expected one of {sorted(SPLITS)}")
    check_positive_integer("num_characters", num_characters)
    part = SPLITS[split]

    def scaled(boundary: int) -> int:  # exact for the full data set: boundary·1623/1623
        return round(boundary * num_characters / NUM_CHARACTERS)

    return sorted(_permutation(num_characters)[scaled(part.start) : scaled(part.stop)])


# --------------------------------------------------------------------------------------------------
# Finding and downloading the zips


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "gbml"
    return Path(cache_dir).expanduser()


def _search_path(root: str | os.PathLike[str] | None, cache: Path) -> list[tuple[Path, str]]:
    """The data folders to look in, in order, with a word on where each comes from."""
    folders = []
    if os.environ.get(DATA_DIR_ENV):
        folders.append((Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"))
    if root is not None:
        folders.append((Path(root).expanduser(), "root argument"))
    folders.append((cache, "cache folder"))
    return folders


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary file in the same folder and rename it into place, so
    that an interrupted write, or two processes writing at once, never leave a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _download(url: str, destination: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response:
        _atomic_write(destination, lambda file: shutil.copyfileobj(response, file))


def _locate_zips(root: str | os.PathLike[str] | None, download: bool, cache: Path) -> dict[str, Path]:
    """Each zip's path (by top folder name), downloading missing ones into the cache folder if
    allowed; raise :class:`MissingDataError` saying what is missing, where we looked and how to
    get it otherwise."""
    folders = _search_path(root, cache)
    found: dict[str, Path] = {}
    missing = []
    for top in ZIP_CHARACTERS:
        candidates = [folder / "omniglot" / f"{top}.zip" for folder, _ in folders]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(top)
        else:
            found[top] = path
    failures = []
    if download:
        for top in missing:
            destination = cache / "omniglot" / f"{top}.zip"
            try:
                _download(URL_BASE + f"{top}.zip", destination)
            except (OSError, ValueError) as error:  # URLError, HTTPError and timeouts are OSErrors
                failures.append(f"  {URL_BASE}{top}.zip: {error}")
            else:
                found[top] = destination
    still_missing = [top for top in missing if top not in found]
    if still_missing:
        files = " and ".join(f"{top}.zip" for top in still_missing)
        looked = "\n".join(f"  {folder / 'omniglot'}  ({why})" for folder, why in folders)
        if download:
            tried = "Downloading failed:\n" + "\n".join(failures)
        else:
            tried = "Not downloading them because download=False."
        urls = "\n".join(f"  {URL_BASE}{top}.zip" for top in still_missing)
        raise MissingDataError(
            f"Omniglot data not found: {files} missing.\n"
            f"Looked for omniglot/<name>.zip in:\n{looked}\n{tried}\n"
            f"To get them, either set {DATA_DIR_ENV} to a folder that holds "
            f"omniglot/images_background.zip and omniglot/images_evaluation.zip, or download\n"
            f"{urls}\ninto {cache / 'omniglot'} (or call load_omniglot(download=True) with network access)."
        )
    return found


# --------------------------------------------------------------------------------------------------
# Checking and preprocessing the zips


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise CorruptDataError(
            f"{path}: not a readable zip file ({error}). Delete it and download it again from "
            f"{URL_BASE}{path.name} (or point {DATA_DIR_ENV} at a good copy)."
        ) from error


def _fingerprint(zips: dict[str, Path]) -> str:
    """A hash of the zips' member names, sizes and CRC-32s and of the preprocessing version."""
    digest = hashlib.sha256(f"omniglot v{_CACHE_VERSION} {IMAGE_SIZE}px LANCZOS\n".encode())
    for top, path in zips.items():
        with _open_zip(path) as archive:
            members = sorted((i.filename, i.file_size, i.CRC) for i in archive.infolist())
        digest.update(f"{top}\n".encode())
        for name, size, crc in members:
            digest.update(f"{name}\t{size}\t{crc:08x}\n".encode())
    return digest.hexdigest()[:16]


def _check_layout(
    where: str, names: list[str], top: str, num_characters: int, drawings: int
) -> list[tuple[str, list[str]]]:
    """Group a zip's member names into characters and check the counts.

    Returns ``(character name, sorted drawing members)`` sorted by (alphabet, character). The
    counts are parameters so that tests can use tiny zips; :func:`load_omniglot` passes the
    real ones.
    """
    characters: dict[tuple[str, str], list[str]] = {}
    for name in names:
        parts = PurePosixPath(name).parts
        # Folder entries, macOS metadata and stray non-PNG files (Thumbs.db…) are not drawings.
        if name.endswith("/") or parts[0] == "__MACOSX" or parts[-1].startswith("."):
            continue
        if parts[0] != top:
            raise CorruptDataError(
                f"{where}: unexpected entry {name!r}; every file should be under the top folder "
                f"{top}/ (is this the right zip?)"
            )
        if not parts[-1].lower().endswith(".png"):
            continue
        if len(parts) != 4:
            raise CorruptDataError(
                f"{where}: unexpected file {name!r}; "
                f"drawings should be {top}/<alphabet>/<character>/<name>.png"
            )
        characters.setdefault((parts[1], parts[2]), []).append(name)
    if len(characters) != num_characters:
        raise CorruptDataError(
            f"{where}: found {len(characters)} character folders under {top}/, expected {num_characters}"
        )
    layout = []
    for alphabet, character in sorted(characters):
        members = sorted(characters[alphabet, character])
        if len(members) != drawings:
            raise CorruptDataError(
                f"{where}: character {alphabet}/{character} has {len(members)} drawings, expected {drawings}"
            )
        layout.append((f"{alphabet}/{character}", members))
    return layout


def _preprocess(data: bytes, where: str) -> bytes:
    """One PNG's bytes → 28×28 uint8 pixels (row-major), strokes bright on a 0 background."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = image.size
            grey = image.convert("L")
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as error:
        raise CorruptDataError(f"{where}: the PNG does not decode ({error})") from error
    if size != (SOURCE_SIZE, SOURCE_SIZE):
        raise CorruptDataError(f"{where}: image is {size[0]}×{size[1]}, expected {SOURCE_SIZE}×{SOURCE_SIZE}")
    small = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return ImageOps.invert(small).tobytes()


def _read_zip(path: Path, top: str, num_characters: int, drawings: int) -> tuple[list[str], Tensor]:
    """Check one zip and preprocess all its drawings: names and a uint8 (C, drawings, 28, 28)."""
    with _open_zip(path) as archive:
        layout = _check_layout(str(path), archive.namelist(), top, num_characters, drawings)
        pixels = bytearray(len(layout) * drawings * IMAGE_SIZE * IMAGE_SIZE)
        step = IMAGE_SIZE * IMAGE_SIZE
        offset = 0
        for _, members in layout:
            for member in members:
                where = f"{path}: {member}"
                try:
                    data = archive.read(member)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
                    raise CorruptDataError(f"{where}: cannot be read from the zip ({error})") from error
                pixels[offset : offset + step] = _preprocess(data, where)
                offset += step
    images = torch.frombuffer(pixels, dtype=torch.uint8)
    return [name for name, _ in layout], images.view(len(layout), drawings, IMAGE_SIZE, IMAGE_SIZE)


def _build(zips: dict[str, Path], counts: dict[str, int]) -> Omniglot:
    names: list[str] = []
    parts = []
    for top, count in counts.items():
        zip_names, images = _read_zip(zips[top], top, count, DRAWINGS)
        names += zip_names
        parts.append(images)
    return Omniglot(torch.cat(parts), names)


def _load_cache(path: Path) -> Omniglot | None:
    """The cached data set, or None (with a warning) if the file is unreadable or malformed."""
    try:
        saved = torch.load(path, weights_only=True)
        data = Omniglot(saved["images"], saved["names"])
        if len(data) != NUM_CHARACTERS:
            raise ValueError(f"it holds {len(data)} characters, not {NUM_CHARACTERS}")
        return data
    except Exception as error:  # any failure means: rebuild it
        warnings.warn(f"ignoring unreadable Omniglot cache {path} ({error}); rebuilding it", stacklevel=3)
        return None


def load_omniglot(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Omniglot:
    """Load all of Omniglot, preprocessed to 28×28, building the cache file on first use.

    ``root`` is a data folder holding ``omniglot/images_*.zip``, searched after
    ``$GBML_DATA_DIR`` and before the cache folder (``cache_dir``, else ``$GBML_CACHE_DIR``,
    else ``~/.cache/gbml``); see the module docstring. Raises :class:`MissingDataError` if the
    zips are missing and cannot be downloaded (or ``download=False``), and
    :class:`CorruptDataError` if their content is wrong.
    """
    cache = _cache_dir(cache_dir)
    zips = _locate_zips(root, download, cache)
    cache_file = cache / "omniglot" / f"omniglot-{IMAGE_SIZE}px-v{_CACHE_VERSION}-{_fingerprint(zips)}.pt"
    if cache_file.is_file():
        data = _load_cache(cache_file)
        if data is not None:
            return data
    data = _build(zips, ZIP_CHARACTERS)
    _atomic_write(
        cache_file, lambda file: torch.save({"images": data.images, "names": list(data.names)}, file)
    )
    return data


def load_omniglot_miniature() -> Omniglot:
    """The Omniglot miniature shipped with gbml: 50 real characters (the first of each alphabet,
    20 drawings each), checked and preprocessed as :func:`load_omniglot` does the full set.

    Needs no data folder, cache or network (it takes about a second to decode). Its splits are
    those of :func:`omniglot_split` for 50 characters. Use it for tests and offline trials; its
    accuracies are not comparable with the papers'.
    """
    zips = {top: MINIATURE_DIR / f"{top}.zip" for top in MINIATURE_CHARACTERS}
    missing = [str(path) for path in zips.values() if not path.is_file()]
    if missing:
        raise MissingDataError(
            f"the Omniglot miniature is missing from this installation of gbml ({', '.join(missing)}); "
            "reinstall gbml, or rebuild it with tools/make_omniglot_miniature.py from the book's repository"
        )
    return _build(zips, MINIATURE_CHARACTERS)


# --------------------------------------------------------------------------------------------------
# Tasks


class OmniglotTasks(TaskFamily):
    """N-way K-shot classification tasks from one Omniglot split.

    A task picks ``ways`` distinct classes of the split (a class is a character, or with
    ``rotations=True`` a character turned by 0°, 90°, 180° or 270° counter-clockwise), gives them
    the labels 0 … N−1 in a random order, and draws ``shots`` support and ``queries`` query
    drawings of each class, all distinct. ``x_support`` has shape (T, N·K, 1, 28, 28), values
    in [0, 1] with strokes 1; ``y_support`` (T, N·K) int64, grouped by label (K samples of
    label 0, then of label 1, …); the query set likewise with N·Q.

    A task's parameters (:meth:`sample_parameters`) are its classes, an int64 tensor (T, N)
    whose column i is the class given label i; class ``c`` is character
    ``characters[c // R]`` turned by ``c % R`` quarter turns (R = 4 with rotations, else 1).

    ``data`` is a loaded :class:`Omniglot` (shared between families without copying); without
    it :func:`load_omniglot` is called with ``root`` and ``download``.
    """

    def __init__(
        self,
        split: str = "train",
        ways: int = 5,
        *,
        rotations: bool = True,
        data: Omniglot | None = None,
        root: str | os.PathLike[str] | None = None,
        download: bool = True,
    ) -> None:
        omniglot_split(split)  # validates the name before any loading
        check_positive_integer("ways", ways)
        if data is None:
            data = load_omniglot(root, download)
        if not isinstance(data, Omniglot):
            raise ValueError(f"data must be an Omniglot (from load_omniglot), got {type(data).__name__}")
        characters = omniglot_split(split, len(data))
        self.split = split
        self.ways = ways
        self.rotations = bool(rotations)
        self.characters = torch.tensor(characters, dtype=torch.int64)
        self.num_rotations = ROTATIONS if self.rotations else 1
        self.num_classes = len(characters) * self.num_rotations
        if ways > self.num_classes:
            size = "" if len(data) == NUM_CHARACTERS else f" of this {len(data)}-character data set"
            raise ValueError(
                f"ways={ways} is more than the {self.num_classes} classes of the {split!r} split{size}"
                f"{'' if self.rotations else ' without rotations'}"
            )
        self.images = data.images

    def __repr__(self) -> str:
        return (
            f"OmniglotTasks(split={self.split!r}, ways={self.ways}, rotations={self.rotations}, "
            f"classes={self.num_classes})"
        )

    def sample_parameters(self, num_tasks: int, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """Draw ``num_tasks`` tasks' classes: a one-tuple holding an int64 (T, ways) tensor of
        distinct classes per row, column i being the class that gets label i."""
        check_counts(num_tasks, 1, 1)
        _check_generator(generator)
        # The first N of a random permutation: distinct classes in a random order (the labels).
        scores = torch.rand(num_tasks, self.num_classes, generator=generator, dtype=torch.float64)
        return (scores.argsort(dim=1)[:, : self.ways],)

    def draw_data(
        self, parameters: tuple[Tensor, ...], num_points: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``num_points`` distinct drawings of every class: float32 images (T, N·num_points, 1, 28, 28)
        in [0, 1] and int64 labels (T, N·num_points), grouped by label."""
        images = self._draw(self._check_classes(parameters), num_points, generator)
        num_tasks, ways = images.shape[:2]
        x = (
            images.to(torch.float32)
            .div_(255)
            .reshape(num_tasks, ways * num_points, 1, IMAGE_SIZE, IMAGE_SIZE)
        )
        return x, _labels(num_tasks, ways, num_points)

    def make_tasks(
        self,
        parameters: tuple[Tensor, ...],
        shots: int,
        queries: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Task:
        """The tasks with these classes: ``shots`` support and ``queries`` query drawings per
        class. Images get ``dtype``; labels stay int64. Sampled on the CPU, then moved."""
        classes = self._check_classes(parameters)
        check_counts(len(classes), shots, queries)
        if shots + queries > DRAWINGS:
            raise ValueError(
                f"shots + queries = {shots} + {queries} is more than the {DRAWINGS} drawings of a character"
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        images = self._draw(classes, shots + queries, generator)
        # Straight from uint8 to the requested dtype, so float64 gets the exact value / 255.
        x = images.to(dtype).div_(255).unsqueeze(3)  # (T, N, K+Q, 1, 28, 28)
        num_tasks, ways = classes.shape

        def flat(part: Tensor) -> Tensor:
            return part.reshape(num_tasks, -1, 1, IMAGE_SIZE, IMAGE_SIZE)

        task = Task(
            flat(x[:, :, :shots]),
            _labels(num_tasks, ways, shots),
            flat(x[:, :, shots:]),
            _labels(num_tasks, ways, queries),
        )
        return task.to(device=device)

    def _check_classes(self, parameters: tuple[Tensor, ...]) -> Tensor:
        if not isinstance(parameters, tuple | list) or len(parameters) != 1:
            raise ValueError("Omniglot task parameters must be a one-tuple (classes,)")
        (classes,) = parameters
        if not isinstance(classes, Tensor) or classes.dim() != 2 or classes.dtype != torch.int64:
            raise ValueError("classes must be an int64 tensor of shape (num_tasks, ways)")
        if classes.shape[1] < 1:
            raise ValueError("a task needs at least one class (ways >= 1)")
        classes = classes.cpu()
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise ValueError(f"classes must lie in [0, {self.num_classes}) for the {self.split!r} split")
        ordered = classes.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("the classes of a task must be distinct")
        return classes

    def _draw(self, classes: Tensor, num_points: int, generator: torch.Generator | None) -> Tensor:
        """uint8 images (T, N, num_points, 28, 28): distinct random drawings of each class."""
        _check_generator(generator)
        num_tasks, ways = classes.shape
        scores = torch.rand(num_tasks, ways, DRAWINGS, generator=generator, dtype=torch.float64)
        drawings = scores.argsort(dim=-1)[..., :num_points]  # distinct: part of a permutation
        characters = self.characters[classes // self.num_rotations]
        turns = classes % self.num_rotations
        images = self.images[characters.unsqueeze(-1), drawings]
        for k in range(1, self.num_rotations):
            chosen = turns == k
            images[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
        return images


def _labels(num_tasks: int, ways: int, per_class: int) -> Tensor:
    return torch.arange(ways).repeat_interleave(per_class).expand(num_tasks, -1).clone()


def _check_generator(generator: torch.Generator | None) -> None:
    # Sampling on the CPU keeps a seed's tasks identical whatever device they end up on.
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"pass a CPU torch.Generator (tasks are sampled on the CPU), got one on {generator.device}"
        )
