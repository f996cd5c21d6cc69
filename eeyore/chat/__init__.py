"""`python -m eeyore.chat`: talk, as the counsellor, to a simulated client in the terminal.

How to read this package: `__main__.py` (flags, the profile, the read-reply loop), `backends.py`
(the in-process engine or an OpenAI-compatible server), `transcript.py` (saved after every turn)."""
