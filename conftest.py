"""Repository-wide pytest setup.

The test command re-executes the book's notebooks with nbval; SMOKE_TEST=1 makes every chapter
shrink its run sizes so that each finishes in well under a minute on a laptop CPU. Set
SMOKE_TEST=0 to check the full runs instead.
"""

import os

os.environ.setdefault("SMOKE_TEST", "1")
