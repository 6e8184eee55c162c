"""`python -m modalign`: the `modalign` command, for launchers that run it with a given interpreter."""

from modalign.cli import main

main()
