"""`python -m armt ...` is `armt ...`."""

from armt.cli import console_main

console_main()
