"""``python -m pyiommufd``: the same as the ``pyiommufd`` command."""
from .cli import main

main()
