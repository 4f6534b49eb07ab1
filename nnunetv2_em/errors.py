"""The one exception type for bad input, and a console hook that prints it as a single clear message."""

import sys


class EMInputError(ValueError):
    """Input the plugin cannot work with. The message names the file or setting at fault and the fix.

    Raised before anything is written, so a failed call leaves the disk as it was.
    """


def _print_input_errors_plainly(exc_type, exc, tb, _previous_hook=sys.excepthook):
    if issubclass(exc_type, EMInputError):
        print(f"nnunetv2_em: error: {exc}", file=sys.stderr)
        return
    _previous_hook(exc_type, exc, tb)


# the stock nnU-Net CLIs (nnUNetv2_train ...) end in an uncaught exception: show ours without a traceback
if getattr(sys.excepthook, "__name__", "") != _print_input_errors_plainly.__name__:
    sys.excepthook = _print_input_errors_plainly
