"""`python -m cifarlab.cli`: the `cifarlab` command."""

from cifarlab.cli import entry

entry()
