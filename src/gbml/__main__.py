import sys

from gbml.cli import main

sys.exit(main())
