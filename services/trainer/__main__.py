"""`python -m modalign.trainer`: run the online trainer (its classes stay importable by their module path,
which the checkpoint's pickled state refers to)."""

from modalign.trainer.service import main

main()
