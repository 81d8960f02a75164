#!/usr/bin/env python
"""`python data_tools/verify_shards.py --help`; same as `accord verify-shards`."""

import sys

from accord.shards.verify import main

if __name__ == "__main__":
    sys.exit(main())
