"""``python -m pyro_lvm.cli``: the ``pyro-lvm`` command, for environments without the console script."""

from . import main

main()
