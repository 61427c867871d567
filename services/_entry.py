"""The ``rlaif`` console script.

It re-executes itself once with glibc's malloc tuned (:mod:`services._malloc`) before it imports the CLI
(typer, the settings, torch through the extensions), so that a re-executed command imports them once.
"""

from __future__ import annotations


def main() -> None:
    from services._malloc import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()

    from services.cli import main as cli_main

    cli_main()
