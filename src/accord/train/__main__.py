import sys

from accord.train.main import main

sys.exit(main())
