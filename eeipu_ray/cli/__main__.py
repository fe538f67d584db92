"""``python -m eeipu_ray.cli``."""

import sys

from eeipu_ray.cli import main

sys.exit(main())
