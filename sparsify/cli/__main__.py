"""``python -m sparsify.cli``: the ``sparsify`` command."""

from sparsify.cli import main

main()
