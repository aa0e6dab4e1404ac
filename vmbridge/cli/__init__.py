"""vmctl: the command-line client of vmbridged (a varlink client only).

Placeholder: vmctl's entry point (``main``) and verb table come with the cli
branch, whose ``__init__.py`` replaces this one at the merge. This file only
makes ``vmbridge.cli`` a regular package, so that the verb modules already here
(status, top, figures) are packaged.
"""
