"""The command line as the tests drive it: click's CliRunner, and the one line every user mistake must produce."""

from __future__ import annotations

from click.testing import CliRunner, Result

from edgequee.cli import main


def invoke(*args: object) -> Result:
    """``edgequee ARGS`` in-process (stdout and stderr kept apart)."""
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="edgequee")


def one_line_error(result: Result) -> str:
    """The single 'Error: ...' line of a user mistake: exit code 1, no traceback, nothing else on stderr."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]
