"""python -m fedblocks.device_runtime ... (see cli.py)."""

import sys

from fedblocks.device_runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
