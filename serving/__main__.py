"""``python -m serving`` runs the ``serving`` CLI."""

from serving.cli import main

main()
