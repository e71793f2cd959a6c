"""The polars-cloud client's own process (see :mod:`.host`)."""

import sys

from pclease_service.backends.polars_cloud.host import main

sys.exit(main(sys.argv[1:]))
