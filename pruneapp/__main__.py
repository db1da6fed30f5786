"""``python -m pruneapp`` and the ``pruneapp`` command."""

from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] in (["prune"], ["inspect"]):  # these load a file: start the loader while torch imports
        from pruneapp import prestart

        prestart.launch()
    from pruneapp.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
