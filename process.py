#!/usr/bin/env python3
"""grand-challenge entrypoint: segment /input CBCT volumes into /output (see `python process.py --help`)."""
import sys

from cbctseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
