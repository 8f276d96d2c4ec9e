"""Entry point of the adbd child process: ``python -m fedblocks.testbed.virtual.daemon_main``.

A module of its own so ``-m`` does not re-import ``adbd`` that the package already loaded.
"""

import sys

from fedblocks.testbed.virtual.adbd import main

if __name__ == "__main__":
    sys.exit(main())
