"""python -m fedmpi.report: the same as fedmpi-report."""

import sys

from fedmpi.report import main

sys.exit(main())
