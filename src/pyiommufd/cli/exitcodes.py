"""The exit codes live in :mod:`pyiommufd.exitcodes` (free of click); this
name stays for the CLI modules that import them from here."""
from ..exitcodes import *  # noqa: F401,F403
