"""`python -m trl_cadet ...`: the same as the `trl-cadet` console script (see `trl_cadet.cli`)."""

import sys

from trl_cadet.cli import main


if __name__ == "__main__":
    sys.exit(main())
