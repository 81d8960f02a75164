#!/usr/bin/env python
"""`python data_tools/build_shards.py --help`; same as `accord build-shards`."""

import sys

from accord.shards.build import main

if __name__ == "__main__":
    sys.exit(main())
