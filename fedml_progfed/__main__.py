"""``python -m fedml_progfed`` is the ``fedml-progfed`` command."""

import sys

from fedml_progfed.cli import main

sys.exit(main())
