"""`python -m sparsert`: the same command line as the `sparsert` script."""
import sys

from .cli import main

sys.exit(main())
