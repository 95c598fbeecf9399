"""``python cli.py ARGS`` from a checkout does what the installed ``vimbench ARGS`` does."""
import sys

from vimbench.commands import main

if __name__ == "__main__":
    sys.exit(main())
