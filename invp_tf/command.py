"""What the five commands (train, evaluate, export, embed, analyze) share: their flags' parsing.

Each command defines its own absl flags (no library module defines any) and has a
`main(argv)` that runs both under absl's `app.run` and in-process, e.g. from a test or a
notebook: `export.main(["invp-export", "--workdir=runs/demo", "--export_dir=exported"])`.
"""

import contextlib

from absl import app
from absl import flags


@contextlib.contextmanager
def parsed(argv, flag_values=flags.FLAGS):
    """Yields the positional arguments of `argv` (program name first), its flags parsed.

    Under `app.run` the flags are parsed already and `argv` holds no flag: nothing is parsed.
    Called in-process with flags, they are parsed over the defaults and reset on exit, so one
    call leaves nothing behind for the next.

    Raises:
      app.UsageError: an unknown flag or a bad value (app.run prints it with the usage).
    """
    if not any(arg.startswith("-") for arg in argv[1:]):
        if not flag_values.is_parsed():  # in-process without flags: the defaults
            flag_values.mark_as_parsed()
        yield argv
        return
    flag_values.unparse_flags()
    try:
        try:
            rest = flag_values(list(argv))
        except flags.Error as e:
            raise app.UsageError(str(e)) from None
        yield rest
    finally:
        flag_values.unparse_flags()


def flag_values_of(argv, holders, flag_values=flags.FLAGS):
    """{name: value} of `holders` ({name: FlagHolder}) with `argv` parsed (see `parsed`).

    Raises:
      app.UsageError: a positional argument besides the program name, an unknown flag or a
        bad value.
    """
    with parsed(argv, flag_values) as args:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
        return {name: holder.value for name, holder in holders.items()}
