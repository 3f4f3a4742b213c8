"""User-facing errors: one clear sentence and a non-zero exit, never a traceback."""

import argparse
import functools
import sys


class UserError(Exception):
    """An error the user caused (bad flag, missing file, broken yaml). Its message is the
    whole report: one sentence that says what is wrong and what to do."""


EXIT_USER_ERROR = 2


def cli(main):
    """Decorate a command's `main(argv)` so a UserError prints `error: <sentence>` on stderr
    and exits with status 2, and Ctrl-C exits with 130 after the command has cleaned up."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`error: ...`) and exit 2, like every other
    user error, instead of the usage block."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help).", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
