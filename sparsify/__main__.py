"""``python -m sparsify``: the ``sparsify`` command."""

from sparsify._entry import main

main()
