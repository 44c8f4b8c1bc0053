"""Running the ``circuits`` command inside the test process (much faster than a subprocess)."""


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """The command line with ``args``: its exit code, stdout and stderr (captured by ``capsys``)."""
    from circuitfinder.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
