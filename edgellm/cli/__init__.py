"""The `edgellm` command line: :mod:`edgellm.cli.main` dispatches to one module per command
(``generate``, ``chat``, ``bench``, ``analyze``, ``quantize``, ``eval``, ``serve``);
:mod:`edgellm.cli.common` holds the options several commands share.
Nothing is imported here, so ``edgellm --help`` stays fast."""
