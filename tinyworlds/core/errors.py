"""The one error type users see.

Anything the user can cause (a missing file, a bad size, an unreadable model) raises
`TinyWorldsError` with a one-line message that names the thing and says what is wrong.
The CLI prints it as `error: <message>` and exits with status 1, without a traceback.
"""

from os import PathLike


class TinyWorldsError(Exception):
    """A user-facing failure; its message is printed as-is on one line."""


class ParameterError(TinyWorldsError):
    """A bad value of a named parameter (or a bad combination of several).

    The library names its own parameters (`frames=0: must be at least 1`); whoever exposes
    them spells them the user's way: the CLI as flags (`--frames 0: ...`, `as_flags`), a
    pipeline stage as params keys (`recordings.pong.frames=0: ...`, `under`).
    """

    def __init__(self, names: str | tuple[str, ...], reason: str, value: object = ...) -> None:
        self.names = (names,) if isinstance(names, str) else tuple(names)
        self.reason, self.value = reason, value
        super().__init__(self._render(lambda name: name, "="))

    def _render(self, spell, separator: str) -> str:
        names = " and ".join(spell(name) for name in self.names)
        shown = str(self.value) if isinstance(self.value, PathLike) else repr(self.value)  # paths unquoted
        value = "" if self.value is ... else f"{separator}{shown}"
        return f"{names}{value}: {self.reason}"

    def as_flags(self) -> str:
        """The message with each parameter as its command-line flag: `--random-actions`."""
        return self._render(lambda name: "--" + name.replace("_", "-"), " ")

    def under(self, prefix: str) -> str:
        """The message with each parameter as a key below `prefix` in params.yaml."""
        return f"params.yaml: {self._render(lambda name: f'{prefix}.{name}', '=')}"
