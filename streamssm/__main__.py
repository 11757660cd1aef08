"""`python -m streamssm` runs the `streamssm` command."""

import sys

from streamssm.cli import main

sys.exit(main())
