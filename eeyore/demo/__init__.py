"""The whole Eeyore method on one CPU: `python -m eeyore.demo` (how to read this package:
`__main__.py` runs the stages in order and resumes; `stages.py` is the method, one function per
stage, each a few of the project's own commands; `servers.py` runs a command or a server;
`summary.py` reads the artifacts back into one screen)."""
