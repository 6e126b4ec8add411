"""Omniglot: finding, checking and caching the zips, the splits, and N-way K-shot tasks.

The first group needs the full data set (the shared, read-only data folder, with a temporary
cache folder built once per module) and is skipped, saying so, where the zips are not found. The
task tests run on the 50-character miniature shipped with gbml and, when it is there, on the
full set too; the broken-input tests use tiny fake zips written with Pillow. So everything but
the full-data checks runs from a bare clone, offline.
"""

import io
import os
import random
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

import gbml
from gbml import omniglot
from gbml.errors import CorruptDataError, MissingDataError
from gbml.omniglot import Omniglot, OmniglotTasks, load_omniglot, omniglot_split
from gbml.tasks import check_task

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    """The shared data folder beside the project (what .ci/run exports as GBML_DATA_DIR); where
    that is absent (the device machine carries the data elsewhere) the caller's GBML_DATA_DIR,
    then gbml's cache folder (where load_omniglot downloads to). Nothing is downloaded here."""
    candidates = [REPO.parent / "shared" / "data"]
    if os.environ.get("GBML_DATA_DIR"):
        candidates.append(Path(os.environ["GBML_DATA_DIR"]))
    candidates.append(omniglot._cache_dir(None))
    for folder in candidates:
        if (folder / "omniglot" / "images_background.zip").is_file():
            return folder
    return candidates[0]  # load_omniglot then fails with a message naming what is missing


def full_data_or_skip() -> Path:
    """The folder holding the full Omniglot zips, or skip the calling test saying where we looked."""
    folder = real_data_dir()
    if not all((folder / "omniglot" / f"{top}.zip").is_file() for top in omniglot.ZIP_CHARACTERS):
        pytest.skip(
            f"full Omniglot not found (looked in {folder}/omniglot, $GBML_DATA_DIR and gbml's cache "
            "folder): this full-data test is skipped; the miniature's tests ran"
        )
    return folder


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real data set, loaded (and its cache built) once, with the environment pointing at the
    shared data and a fresh cache folder for the rest of this module."""
    full_data_or_skip()
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("gbml-cache")
        patch.setenv("GBML_DATA_DIR", str(real_data_dir()))
        patch.setenv("GBML_CACHE_DIR", str(cache))
        start = time.perf_counter()
        data = load_omniglot(download=False)
        yield SimpleNamespace(data=data, cache=cache, build_seconds=time.perf_counter() - start)


@pytest.fixture(scope="module")
def miniature():
    return gbml.load_omniglot_miniature()


@pytest.fixture(scope="module", params=["miniature", "full"])
def data(request, miniature):
    """The task tests' data: the miniature always, the full set when it is found."""
    return miniature if request.param == "miniature" else request.getfixturevalue("real").data


@pytest.fixture(scope="module")
def drawing_index(data):
    """Every drawing's pixels → [(character, drawing)], to identify sampled images independently."""
    index: dict[bytes, list[tuple[int, int]]] = {}
    flat = data.images.reshape(-1, 28 * 28).numpy()
    for i, row in enumerate(flat):
        index.setdefault(row.tobytes(), []).append(divmod(i, 20))
    return index


def identify(image: torch.Tensor, index) -> set[tuple[int, int, int]]:
    """All (character, quarter turns, drawing) whose cached drawing, turned, is this image."""
    pixels = (image.reshape(28, 28).double() * 255).round().to(torch.uint8)
    found = set()
    for turns in range(4):
        unturned = torch.rot90(pixels, -turns, dims=(0, 1)).contiguous()
        found |= {(c, turns, d) for c, d in index.get(unturned.numpy().tobytes(), [])}
    return found


def check_classes_of(task: gbml.Task, index, characters: set[int], *, rotations: bool) -> list:
    """Assert each label's support and query images are distinct drawings of one character,
    turned alike, from ``characters``; return each task's [(character, turns)] by label."""
    found = []
    for t in range(task.num_tasks):
        classes = []
        for label in range(int(task.y_support[t].max()) + 1):
            images = torch.cat(
                [task.x_support[t][task.y_support[t] == label], task.x_query[t][task.y_query[t] == label]]
            )
            matches = [identify(image, index) for image in images]
            common = set.intersection(*({(c, k) for c, k, _ in m} for m in matches))
            assert len(common) == 1, f"task {t} label {label}: images of different classes {matches}"
            ((character, turns),) = common
            assert character in characters and (rotations or turns == 0)
            drawings = [frozenset(d for c, k, d in m if (c, k) == (character, turns)) for m in matches]
            # A few drawings are pixel-identical at 28×28 (Braille's dots): an image then names
            # all of them, and distinct drawings means no more copies of it than such drawings.
            for candidates in set(drawings):
                assert drawings.count(candidates) <= len(candidates), "a drawing appears twice in one task"
            classes.append((character, turns))
        found.append(classes)
    return found


# --------------------------------------------------------------------------------------------------
# The real data set


def test_whole_data_set_has_the_documented_shape_order_and_values(real):
    data = real.data
    assert isinstance(data, Omniglot) and len(data) == 1623
    assert data.images.shape == (1623, 20, 28, 28) and data.images.dtype == torch.uint8
    assert len(set(data.names)) == 1623
    # Background zip first, then evaluation, each sorted by (alphabet, character).
    assert data.names[0] == "Alphabet_of_the_Magi/character01"
    assert data.names[963] == "Tifinagh/character55" and data.names[964] == "Angelic/character01"
    for part in (data.names[:964], data.names[964:]):
        assert list(part) == sorted(part, key=lambda name: tuple(name.split("/")))
    # Strokes bright on a dark background: mostly zeros, and every drawing has a bright stroke.
    images = data.images.float() / 255
    assert 0.04 < float(images.mean()) < 0.15
    assert float((data.images == 0).float().mean()) > 0.6
    assert bool((data.images.amax(dim=(2, 3)) > 128).all()) and int(data.images.max()) == 255


@pytest.mark.parametrize(("character", "drawing"), [(0, 0), (1622, 19), (964, 7)])
def test_cached_drawings_are_the_zips_pngs_antialiased_and_inverted(real, character, drawing):
    name = real.data.names[character]
    top = "images_background" if character < 964 else "images_evaluation"
    with zipfile.ZipFile(real_data_dir() / "omniglot" / f"{top}.zip") as archive:
        members = sorted(
            n for n in archive.namelist() if n.startswith(f"{top}/{name}/") and n.endswith(".png")
        )
        png = Image.open(io.BytesIO(archive.read(members[drawing])))
    assert png.size == (105, 105) and png.mode == "1"
    small = png.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    expected = 255 - torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(28, 28).long()
    assert torch.equal(real.data.images[character, drawing].long(), expected)


def test_second_load_reads_the_cache_file_without_rebuilding(real, monkeypatch):
    (cache_file,) = (real.cache / "omniglot").iterdir()  # one file, no temporary left behind
    assert cache_file.name.startswith("omniglot-28px-v1-") and cache_file.suffix == ".pt"

    def no_rebuild(zips, counts):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(omniglot, "_build", no_rebuild)
    start = time.perf_counter()
    again = load_omniglot(download=False)
    seconds = time.perf_counter() - start
    assert torch.equal(again.images, real.data.images) and again.names == real.data.names
    assert seconds < 5, f"loading the cache took {seconds:.1f} s"


def test_an_unreadable_cache_file_is_rebuilt_with_a_warning(real, tmp_path, monkeypatch):
    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path))
    (cache_file,) = (real.cache / "omniglot").iterdir()
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / cache_file.name).write_bytes(b"not a torch file")
    builds = []
    monkeypatch.setattr(omniglot, "_build", lambda zips, counts: builds.append(zips) or real.data)
    with pytest.warns(UserWarning, match="unreadable Omniglot cache"):
        load_omniglot(download=False)
    assert len(builds) == 1
    assert torch.equal(load_omniglot(download=False).images, real.data.images) and len(builds) == 1


def test_splits_are_disjoint_fixed_and_of_the_standard_sizes():
    splits = {name: omniglot_split(name) for name in ("train", "val", "trainval", "test")}
    assert {name: len(s) for name, s in splits.items()} == {
        "train": 1100,
        "val": 100,
        "trainval": 1200,
        "test": 423,
    }
    train, val, test = set(splits["train"]), set(splits["val"]), set(splits["test"])
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(1623)) and set(splits["trainval"]) == train | val
    # Recomputing gives the same permutation, and it is pinned: the same on every machine.
    omniglot._permutation.cache_clear()
    assert omniglot_split("test") == splits["test"]
    assert omniglot._permutation(1623)[:8] == (760, 1305, 1250, 540, 1449, 257, 76, 1364)
    assert splits["val"][:5] == [7, 11, 27, 34, 38]


def test_splits_of_a_smaller_data_set_cut_the_same_fractions():
    for size, expected in ((50, (34, 3, 13)), (200, (136, 12, 52)), (1, (1, 0, 0))):
        splits = {name: omniglot_split(name, size) for name in ("train", "val", "trainval", "test")}
        assert tuple(len(splits[name]) for name in ("train", "val", "test")) == expected
        assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(size))
        assert splits["trainval"] == sorted(splits["train"] + splits["val"])
    # The miniature's own permutation, pinned like the full set's.
    assert omniglot_split("val", 50) == [8, 22, 27]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_characters must be a positive integer"):
            omniglot_split("train", bad)


def test_the_miniature_is_one_real_character_per_alphabet_and_needs_no_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GBML_DATA_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    mini = gbml.load_omniglot_miniature()
    assert isinstance(mini, Omniglot) and mini.images.shape == (50, 20, 28, 28)
    alphabets = [name.split("/")[0] for name in mini.names]
    assert len(set(alphabets)) == 50 and all(name.endswith("/character01") for name in mini.names)
    assert mini.names[0] == "Alphabet_of_the_Magi/character01" and mini.names[30] == "Angelic/character01"
    for part in (mini.names[:30], mini.names[30:]):
        assert list(part) == sorted(part)
    assert (
        bool((mini.images.amax(dim=(2, 3)) > 128).all())
        and 0.04 < float(mini.images.float().mean() / 255) < 0.15
    )
    assert not (tmp_path / "cache").exists()  # nothing cached, nothing downloaded
    assert repr(mini) == "Omniglot(50 characters × 20 drawings, 28×28 uint8)"


def test_the_miniature_is_exactly_the_full_sets_characters(real, miniature):
    """Its drawings are the full data set's (same PNGs, same preprocessing), character by character."""
    rows = [real.data.names.index(name) for name in miniature.names]
    assert torch.equal(miniature.images, real.data.images[rows])


def test_a_missing_miniature_says_how_to_get_it_back(tmp_path, monkeypatch):
    monkeypatch.setattr(omniglot, "MINIATURE_DIR", tmp_path)
    with pytest.raises(
        MissingDataError, match="reinstall gbml, or rebuild it with tools/make_omniglot_miniature"
    ):
        gbml.load_omniglot_miniature()


def test_rotations_make_four_classes_per_character(data, drawing_index):
    size = len(data)
    for split in ("train", "val", "test"):
        characters = len(omniglot_split(split, size))
        assert OmniglotTasks(split, 5, data=data).num_classes == 4 * characters
        assert OmniglotTasks(split, 2, rotations=False, data=data).num_classes == characters
    # Class c is character characters[c // 4] turned c % 4 quarter turns.
    family = OmniglotTasks("val", 4, data=data)
    last = family.num_classes - 1
    classes = torch.tensor([[0, 1, 2, 3], [last, 7, 5, 10]])
    task = family.make_tasks((classes,), 2, 3, torch.Generator().manual_seed(0))
    found = check_classes_of(task, drawing_index, set(omniglot_split("val", size)), rotations=True)
    expected = [[(int(family.characters[c // 4]), c % 4) for c in row.tolist()] for row in classes]
    assert found == expected
    # Without rotations every class is a character upright.
    task = OmniglotTasks("test", 5, rotations=False, data=data).sample(
        3, 2, 2, torch.Generator().manual_seed(3)
    )
    check_classes_of(task, drawing_index, set(omniglot_split("test", size)), rotations=False)


def test_five_way_one_shot_tasks(data, drawing_index):
    family = OmniglotTasks("train", 5, data=data)
    tasks = family.sample(8, 1, 15, torch.Generator().manual_seed(0))
    check_task(tasks, batched=True)
    assert tasks.x_support.shape == (8, 5, 1, 28, 28) and tasks.x_query.shape == (8, 75, 1, 28, 28)
    assert tasks.y_support.shape == (8, 5) and tasks.y_query.shape == (8, 75)
    assert tasks.x_support.dtype == torch.float32 and tasks.y_support.dtype == torch.int64
    assert float(tasks.x_query.min()) >= 0 and float(tasks.x_query.max()) <= 1
    for t in range(8):
        assert torch.bincount(tasks.y_support[t]).tolist() == [1] * 5
        assert torch.bincount(tasks.y_query[t]).tolist() == [15] * 5
    found = check_classes_of(tasks, drawing_index, set(omniglot_split("train", len(data))), rotations=True)
    # Sampling = parameters then data with the same generator; classes are distinct per task,
    # in a random label order, and rotations are used.
    generator = torch.Generator().manual_seed(0)
    (classes,) = family.sample_parameters(8, generator)
    assert found == [[(int(family.characters[c // 4]), c % 4) for c in row.tolist()] for row in classes]
    assert all(len(set(row)) == 5 for row in found)
    assert not all(row == sorted(row) for row in classes.tolist())
    assert {k for row in found for _, k in row} != {0}


def test_the_same_seed_gives_the_same_tasks(data):
    family = OmniglotTasks("test", 20, data=data)
    a = family.sample(4, 5, 5, torch.Generator().manual_seed(11))
    b = family.sample(4, 5, 5, torch.Generator().manual_seed(11))
    c = family.sample(4, 5, 5, torch.Generator().manual_seed(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.x_query, c.x_query)
    # float64 images are the exact pixel values / 255; labels stay int64; device is honoured.
    d = family.sample(4, 5, 5, torch.Generator().manual_seed(11), device="cpu", dtype=torch.float64)
    assert d.x_support.dtype == torch.float64 and d.y_support.dtype == torch.int64
    assert torch.equal(d.x_support.float(), a.x_support)
    assert torch.equal((d.x_support * 255).round() / 255, d.x_support)
    # draw_data (the TaskFamily hook) gives the support and query images in one tensor per class.
    (classes,) = family.sample_parameters(2, torch.Generator().manual_seed(1))
    x, y = family.draw_data((classes,), 3, torch.Generator().manual_seed(2))
    assert x.shape == (2, 60, 1, 28, 28) and y.tolist() == [sorted(list(range(20)) * 3)] * 2


# --------------------------------------------------------------------------------------------------
# Broken inputs (tiny fake zips)


def png_bytes(seed: int = 0, size: int = 105) -> bytes:
    """A one-bit PNG with a random stroke, as in Omniglot."""
    rng = random.Random(seed)
    image = Image.new("1", (size, size), 1)
    ImageDraw.Draw(image).line(
        [(rng.randrange(size), rng.randrange(size)) for _ in range(4)], fill=0, width=3
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_zip(
    path: Path, top: str, drawings: dict[str, int], *, replace: dict | None = None, **options
) -> Path:
    """A zip with ``drawings[character]`` PNGs in ``top/<alphabet>/<character>/``; ``replace``
    maps member names to other contents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = {
        f"{top}/{character}/{i:04d}_{j + 1:02d}.png": png_bytes(i * 100 + j)
        for i, (character, count) in enumerate(drawings.items())
        for j in range(count)
    }
    members.update(replace or {})
    with zipfile.ZipFile(path, "w", **options) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


TINY = {"Alpha/character01": 3, "Alpha/character02": 3, "Beta/character01": 3}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No GBML_DATA_DIR, a temporary cache folder, and ``root`` a data folder in tmp_path."""
    monkeypatch.delenv("GBML_DATA_DIR", raising=False)
    monkeypatch.setenv("GBML_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    return SimpleNamespace(root=root, cache=tmp_path / "cache", zips=root / "omniglot")


def test_a_tiny_valid_zip_is_read_in_the_documented_order(isolated):
    path = write_zip(isolated.zips / "images_background.zip", "images_background", TINY)
    names, images = omniglot._read_zip(path, "images_background", 3, 3)
    assert names == ["Alpha/character01", "Alpha/character02", "Beta/character01"]
    assert images.shape == (3, 3, 28, 28) and images.dtype == torch.uint8
    assert int(images[0, 0].max()) > 200 and float((images == 0).float().mean()) > 0.5


def test_a_file_that_is_not_a_zip_is_named(isolated):
    for top in ("images_background", "images_evaluation"):
        (isolated.zips / f"{top}.zip").write_bytes(os.urandom(2000))
    with pytest.raises(
        CorruptDataError, match=r"images_background\.zip: not a readable zip.*download it again"
    ):
        load_omniglot(isolated.root, download=False)
    # Nothing was written next to the data.
    assert sorted(p.name for p in isolated.zips.iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]


def test_a_missing_drawing_is_reported_with_the_count(isolated):
    path = write_zip(
        isolated.zips / "images_background.zip", "images_background", {**TINY, "Alpha/character02": 2}
    )
    with pytest.raises(
        CorruptDataError,
        match=r"images_background\.zip: character Alpha/character02 has 2 drawings, expected 3",
    ):
        omniglot._read_zip(path, "images_background", 3, 3)


def test_the_public_loader_checks_the_real_counts(isolated):
    write_zip(isolated.zips / "images_background.zip", "images_background", TINY)
    write_zip(isolated.zips / "images_evaluation.zip", "images_evaluation", TINY)
    with pytest.raises(
        CorruptDataError, match=r"found 3 character folders under images_background/, expected 964"
    ):
        load_omniglot(isolated.root, download=False)
    # A full-size layout with one drawing short is caught too (names only: no image is decoded).
    names = [
        f"images_background/A{i // 40:02d}/character{i % 40:02d}/{d:02d}.png"
        for i in range(964)
        for d in range(20)
    ]
    names.remove("images_background/A05/character17/07.png")
    with pytest.raises(CorruptDataError, match=r"character A05/character17 has 19 drawings, expected 20"):
        omniglot._check_layout("images_background.zip", names, "images_background", 964, 20)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "the PNG does not decode"),
        (png_bytes()[:60], "the PNG does not decode"),
        (png_bytes(size=50), r"image is 50×50, expected 105×105"),
    ],
    ids=["garbage", "truncated", "wrong-size"],
)
def test_a_bad_png_is_named(isolated, content, problem):
    bad = "images_evaluation/Beta/character01/0002_02.png"
    path = write_zip(
        isolated.zips / "images_evaluation.zip", "images_evaluation", TINY, replace={bad: content}
    )
    with pytest.raises(CorruptDataError, match=rf"images_evaluation\.zip: {bad}: {problem}"):
        omniglot._read_zip(path, "images_evaluation", 3, 3)


def test_a_zip_with_the_wrong_top_folder_is_reported(isolated):
    path = write_zip(isolated.zips / "images_background.zip", "images_evaluation", TINY)
    with pytest.raises(CorruptDataError, match=r"top folder images_background/"):
        omniglot._read_zip(path, "images_background", 3, 3)


def test_missing_zips_say_which_where_and_how_to_get_them(isolated, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("GBML_DATA_DIR", str(empty))
    write_zip(isolated.zips / "images_background.zip", "images_background", TINY)
    with pytest.raises(MissingDataError) as caught:
        load_omniglot(isolated.root, download=False)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert "images_evaluation.zip missing" in message and "images_background.zip missing" not in message
    for where in (empty / "omniglot", isolated.zips, isolated.cache / "omniglot"):
        assert str(where) in message
    assert "GBML_DATA_DIR" in message and "download=False" in message
    assert (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip"
        in message
    )
    assert not isolated.cache.exists()


def test_missing_zips_are_downloaded_into_the_cache_atomically(isolated, tmp_path, monkeypatch):
    server = tmp_path / "server"
    write_zip(server / "images_background.zip", "images_background", TINY)
    write_zip(server / "images_evaluation.zip", "images_evaluation", TINY)
    monkeypatch.setattr(omniglot, "URL_BASE", server.as_uri() + "/")
    write_zip(isolated.zips / "images_background.zip", "images_background", TINY)
    found = omniglot._locate_zips(isolated.root, True, isolated.cache)
    assert found["images_background"] == isolated.zips / "images_background.zip"
    assert found["images_evaluation"] == isolated.cache / "omniglot" / "images_evaluation.zip"
    assert found["images_evaluation"].read_bytes() == (server / "images_evaluation.zip").read_bytes()
    assert [p.name for p in (isolated.cache / "omniglot").iterdir()] == ["images_evaluation.zip"]
    # A failed download (here: not on the server) is a MissingDataError that says why.
    (isolated.cache / "omniglot" / "images_evaluation.zip").unlink()
    monkeypatch.setattr(omniglot, "URL_BASE", (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(MissingDataError, match=r"(?s)images_evaluation\.zip missing.*Downloading failed"):
        omniglot._locate_zips(isolated.root, True, isolated.cache)
    assert list((isolated.cache / "omniglot").iterdir()) == []


def test_the_fingerprint_follows_the_content_not_the_packing(tmp_path):
    a = write_zip(tmp_path / "a" / "images_background.zip", "images_background", TINY)
    b = write_zip(
        tmp_path / "b" / "images_background.zip", "images_background", TINY, compression=zipfile.ZIP_DEFLATED
    )
    changed = "images_background/Alpha/character01/0000_01.png"
    c = write_zip(
        tmp_path / "c" / "images_background.zip", "images_background", TINY, replace={changed: png_bytes(99)}
    )
    assert a.read_bytes() != b.read_bytes()
    fingerprints = [omniglot._fingerprint({"images_background": path}) for path in (a, b, c)]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


# --------------------------------------------------------------------------------------------------
# Bad arguments


@pytest.fixture(scope="module")
def blank():
    return Omniglot(
        torch.zeros(1623, 20, 28, 28, dtype=torch.uint8), [f"A/character{i}" for i in range(1623)]
    )


def test_bad_arguments_are_value_errors(blank):
    with pytest.raises(ValueError, match="unknown Omniglot split 'training'"):
        OmniglotTasks("training", 5, data=blank)
    with pytest.raises(ValueError, match="unknown Omniglot split"):
        omniglot_split("validation")
    for ways in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="ways must be a positive integer"):
            OmniglotTasks("train", ways, data=blank)
    with pytest.raises(ValueError, match=r"ways=4401 is more than the 4400 classes of the 'train' split"):
        OmniglotTasks("train", 4401, data=blank)
    with pytest.raises(
        ValueError, match=r"101 is more than the 100 classes of the 'val' split without rotations"
    ):
        OmniglotTasks("val", 101, rotations=False, data=blank)
    with pytest.raises(ValueError, match="must be an Omniglot"):
        OmniglotTasks("train", 5, data=torch.zeros(3))
    family = OmniglotTasks("val", 5, data=blank)
    with pytest.raises(ValueError, match=r"shots \+ queries = 5 \+ 16 is more than the 20 drawings"):
        family.sample(2, 5, 16)
    for counts in ((0, 1, 1), (2, 0, 1), (2, 1, 0)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            family.sample(*counts)
    with pytest.raises(ValueError, match="floating-point"):
        family.sample(2, 1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="distinct"):
        family.make_tasks((torch.tensor([[1, 2, 2, 3, 4]]),), 1, 1)
    with pytest.raises(ValueError, match=r"lie in \[0, 400\)"):
        family.make_tasks((torch.tensor([[1, 2, 3, 4, 400]]),), 1, 1)
    with pytest.raises(ValueError, match="uint8 tensor of shape"):
        Omniglot(torch.zeros(1623, 20, 28, 28), blank.names)
    # The largest legal task works: 20 drawings split between support and query.
    assert family.sample(1, 19, 1).x_query.shape == (1, 5, 1, 28, 28)
