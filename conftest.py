"""Repository-wide pytest setup.

The test command re-executes the book's notebooks with nbval; SMOKE_TEST=1 makes every chapter
shrink its run sizes so that each finishes in well under a minute on a laptop CPU. Set
SMOKE_TEST=0 to check the full runs instead.
"""

import os
from pathlib import Path

os.environ.setdefault("SMOKE_TEST", "1")

# Omniglot for the data tests and the Omniglot chapter: the project's shared data folder when it
# sits beside the clone (as in CI), otherwise gbml's own lookup (cache folder, then download).
_shared_data = Path(__file__).resolve().parent.parent / "shared" / "data"
if "GBML_DATA_DIR" not in os.environ and (_shared_data / "omniglot").is_dir():
    os.environ["GBML_DATA_DIR"] = str(_shared_data)
