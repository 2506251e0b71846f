"""`python -m infer_recipes.cli`."""
import sys

from . import main

sys.exit(main())
