"""`python -m hasten.cli …` is `hasten …` (the load test and tests start the server this way)."""
from . import main

main()
