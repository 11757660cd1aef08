"""The ``streamssm`` commands, one module per command, each with ``main(argv, prog) -> int``.

``streamssm/cli.py`` routes to them (its ``COMMANDS`` table) and holds the one error path: a
command raises (a :class:`~streamssm.errors.StreamSSMError`, an ``OSError``) and never prints
its own errors. A new command is a module here plus one row in ``COMMANDS``. Options are parsed
with :mod:`streamssm.commands.parsing` (errors become one line; settings dataclasses become
options and ``--config`` files).
"""
