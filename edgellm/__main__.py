"""`python -m edgellm ...` is the `edgellm` command."""

import sys

from edgellm.cli.main import main

sys.exit(main())
