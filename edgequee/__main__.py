"""``python -m edgequee``: the command line (edgequee/cli.py)."""

from .cli import main

if __name__ == "__main__":
    main()
