"""The `kimi-label` console: the user's one entry point (`flows.console.app`).

It sits on top of the flows it runs, so it lives on their floor; the commands' options are
derived from the parameter models (`flows.console.options`), never written by hand.
"""

from flows.console.app import main

__all__ = ["main"]
