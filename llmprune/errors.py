"""The one exception type for user errors, and the one for outputs the machine could not write.

The CLI turns an ``LlmpruneError`` into a single line on stderr and exit code 2, and an
``OSError`` (``OutputError`` among them) into one line and exit code 1; anything else is a bug
and keeps its traceback.
"""


class LlmpruneError(Exception):
    """Bad input from the user: the message names the problem and the fix, in one line.

    Every check of the library raises it (unknown method or dataset, a sparsity out of range, a
    missing data file, an output path that cannot be written, a model that cannot be loaded), as
    early as the inputs allow: before the model loads where the inputs alone tell. Messages name
    the command-line flag (``--nsamples``); the Python field or argument has the same name
    without the dashes (``nsamples=``).

    Example::

        >>> import llmprune
        >>> try:
        ...     llmprune.PruneConfig(method="wanda", sparsity=1.5)
        ... except llmprune.LlmpruneError as exc:
        ...     print(exc)
        sparsity 1.5 is outside [0, 1): ...
    """


class OutputError(OSError):
    """Outputs that could not be written after the work was done (a full disk, a file-size limit,
    a folder that cannot be replaced), raised once every other output has been written.

    ``errors``: one line per output that failed (``could not write ...: why``); ``result``: what
    the run produced (the :class:`llmprune.PruneResult` of :func:`llmprune.prune_model`), so
    nothing is lost. The CLI prints each line and exits with code 1.
    """

    def __init__(self, errors: list[str], result: object = None) -> None:
        super().__init__("; ".join(errors))
        self.errors = list(errors)
        self.result = result
