"""`python -m flexkv ...` = the `flexkv` command."""
import sys

from flexkv.cli import main

sys.exit(main())
