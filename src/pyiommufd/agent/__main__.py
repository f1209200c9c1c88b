"""``python -m pyiommufd.agent [--background] [--socket PATH] [--log-file PATH]``:
what :func:`pyiommufd.agent.ensure_running` spawns (a fresh process, so the
daemon inherits none of the caller's fds)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyiommufd.agent")
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--socket")
    parser.add_argument("--log-file")
    args = parser.parse_args(argv)
    from .. import errors
    from ..exitcodes import exit_code_for
    from .daemon import configure_logging, run_foreground, start_background

    try:
        if args.background:
            pid = start_background(args.socket, log_file=args.log_file)
            print(pid)
            return 0
        configure_logging(stream=sys.stderr)
        run_foreground(args.socket)
        return 0
    except errors.PyiommufdError as exc:
        print(f"pyiommufd: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except OSError as exc:
        print(f"pyiommufd: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)


if __name__ == "__main__":
    sys.exit(main())
