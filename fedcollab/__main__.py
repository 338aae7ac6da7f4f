"""``python -m fedcollab``: the ``fedcollab`` command."""

from fedcollab.cli import main

main()
