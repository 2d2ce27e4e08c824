"""What the commands (train, evaluate, export, embed, analyze, import) share: their flags.

Every command module is built the same way: a frozen dataclass whose fields are its flags
(`field`: default and help), the flags defined from it (`define_fields`, wrapped in `Flags`),
and a `main(argv)` that turns the parsed values into that dataclass and makes one library
call. No library module defines flags, and no command module re-exports library names.
`main` runs both under absl's `app.run` and in-process, e.g. from a test or a notebook:
`export.main(["invp-export", "--workdir=runs/demo", "--export_dir=exported"])`.
Every command checks the paths it writes (`workdir.check_output`) before it reads any data or
model.
"""

import contextlib
import dataclasses
import os
import sys
import typing

from absl import app
from absl import flags
from absl import logging

# The flags that define_fields defines belong to the command calling it: --help lists a
# module's own flags, and without this it would attribute them to this module.
flags.disclaim_key_flags()

# absl's DEFINE function of each field type of a flag dataclass.
_DEFINE = {
    bool: flags.DEFINE_bool,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


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


def define_fields(dataclass, choices, flag_values=flags.FLAGS):
    """One absl flag per field of `dataclass`: its name, default and metadata["help"].

    A field named in `choices` ({name: values}) is an enum, so --help lists its values; the
    others take the type of their default, or of their annotation when the default is None.

    Returns:
      {name: FlagHolder}, in field order.
    """
    hints = typing.get_type_hints(dataclass)
    holders = {}
    for field in dataclasses.fields(dataclass):
        name, default, help_text = field.name, field.default, field.metadata["help"]
        if name in choices:
            holders[name] = flags.DEFINE_enum(
                name, default, choices[name], help_text, flag_values=flag_values
            )
            continue
        kind = type(default)
        if default is None:  # `int | None`: the one type that is not None
            (kind,) = [t for t in typing.get_args(hints[name]) if t is not type(None)]
        holders[name] = _DEFINE[kind](name, default, help_text, flag_values=flag_values)
    return holders


def field(default, help_text):
    """A field of a command's flag dataclass: its flag's default and help (`define_fields`)."""
    return dataclasses.field(default=default, metadata={"help": help_text})


_WARNED = set()


def define_deprecated_alias(old, new, flag_values=flags.FLAGS):
    """--old as a deprecated spelling of --new: it sets --new and warns, once per process,
    that it will go in the next release."""
    flags.DEFINE_alias(old, new, flag_values=flag_values)
    alias = flag_values[old]
    parse = alias.parse

    def parse_and_warn(argument):
        if old not in _WARNED:
            _WARNED.add(old)
            logging.warning("--%s is deprecated and goes in the next release: use --%s", old, new)
        parse(argument)

    alias.parse = parse_and_warn


class Flags:
    """The flags of one command, defined by `define(flag_values) -> {name: FlagHolder}`.

    By default they live in their own FlagValues, so that every command's `main(argv)` runs
    in one process beside the others (their flag names overlap); `run` defines them again in
    absl's FLAGS, where `app.run` parses the command line and --help lists them.

    Args:
      define: fn(flag_values) -> {name: FlagHolder}.
      flag_values: where to define them on import; absl's FLAGS for a command whose tests
        parse FLAGS themselves (train).
    """

    def __init__(self, define, flag_values=None):
        self._define = define
        self.flag_values = flags.FlagValues() if flag_values is None else flag_values
        self.holders = define(self.flag_values)

    def values(self, argv):
        """{name: value} of the command line `argv` (see `flag_values_of`)."""
        return flag_values_of(argv, self.holders, self.flag_values)

    def run(self, main):
        """Runs `main` as the program: flags in absl's FLAGS, parsed from sys.argv.

        A Ctrl-C that `main` does not handle itself (training saves and stops on its own)
        ends the program with one line and status 130, not a traceback.
        """
        if self.flag_values is not flags.FLAGS:
            self.flag_values, self.holders = flags.FLAGS, self._define(flags.FLAGS)
        try:
            app.run(main)
        except KeyboardInterrupt:
            spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
            program = spec.name if spec else os.path.basename(sys.argv[0])
            logging.debug("interrupted", exc_info=True)
            print(f"{program}: interrupted (Ctrl-C)", file=sys.stderr)
            sys.exit(130)


@contextlib.contextmanager
def exits_on(program, *errors):
    """Ends the program on `errors` with one line `PROGRAM: error: MESSAGE` and status 1.

    The traceback goes to the debug log (--verbosity=1), not to the user.
    """
    try:
        yield
    except errors as e:
        logging.debug("stopped", exc_info=True)
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(1)
