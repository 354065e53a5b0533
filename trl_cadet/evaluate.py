"""`python -m trl_cadet.evaluate ...`: the same as `trl-cadet evaluate ...` (see `trl_cadet.cli`)."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
