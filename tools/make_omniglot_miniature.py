"""Build the Omniglot miniature that ships with gbml, from the full zips.

The miniature is the first character (by folder name) of each of Omniglot's 50 alphabets, all
20 drawings, copied byte for byte from the original zips into two zips of the same layout:
``src/gbml/data/omniglot-mini/images_background.zip`` (30 characters) and
``images_evaluation.zip`` (20). Members are stored (PNGs do not compress further) with a fixed
timestamp, so rebuilding from the same source gives identical files.

    python tools/make_omniglot_miniature.py [DATA_DIR]   # DATA_DIR holds omniglot/images_*.zip
                                                         # (default: $GBML_DATA_DIR)
"""

import os
import sys
import zipfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
DESTINATION = ROOT / "src" / "gbml" / "data" / "omniglot-mini"
TOPS = ("images_background", "images_evaluation")
TIMESTAMP = (2015, 12, 11, 0, 0, 0)  # Lake et al., Science 350(6266), 2015


def first_character_of_each_alphabet(archive: zipfile.ZipFile, top: str) -> dict[str, list[str]]:
    """The PNG members of each alphabet's first character folder, by ``alphabet/character``."""
    characters: dict[tuple[str, str], list[str]] = {}
    for name in archive.namelist():
        parts = PurePosixPath(name).parts
        if len(parts) == 4 and parts[0] == top and parts[3].endswith(".png"):
            characters.setdefault((parts[1], parts[2]), []).append(name)
    chosen = {}
    for alphabet in sorted({a for a, _ in characters}):
        character = min(c for a, c in characters if a == alphabet)
        chosen[f"{alphabet}/{character}"] = sorted(characters[alphabet, character])
    return chosen


def main() -> None:
    data_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ["GBML_DATA_DIR"])
    DESTINATION.mkdir(parents=True, exist_ok=True)
    for top in TOPS:
        with zipfile.ZipFile(data_dir / "omniglot" / f"{top}.zip") as source:
            chosen = first_character_of_each_alphabet(source, top)
            with zipfile.ZipFile(DESTINATION / f"{top}.zip", "w", zipfile.ZIP_STORED) as target:
                for members in chosen.values():
                    for member in members:
                        info = zipfile.ZipInfo(member, date_time=TIMESTAMP)
                        info.external_attr = 0o644 << 16
                        target.writestr(info, source.read(member))
        size = (DESTINATION / f"{top}.zip").stat().st_size
        print(f"{top}.zip: {len(chosen)} characters, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
