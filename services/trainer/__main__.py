"""`python -m modalign.trainer`: run the online trainer."""

from modalign.trainer.service import main

main()
