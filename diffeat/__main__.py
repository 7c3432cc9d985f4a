"""``python -m diffeat`` runs the command line."""

from diffeat.cli import main

main()
