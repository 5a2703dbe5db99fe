"""`python -m lorif_stream` is the command line (and `torchrun ... -m lorif_stream` runs it on every rank)."""
from .cli import main

main()
