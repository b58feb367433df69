"""``python -m lookalike.cli``: the same as the ``lookalike`` command."""

from . import main

main()
