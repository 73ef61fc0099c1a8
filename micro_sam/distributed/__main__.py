"""``python -m micro_sam.distributed`` runs the command line ``micro_sam.distributed_segmentation``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
