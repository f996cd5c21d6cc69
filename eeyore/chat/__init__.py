"""`python -m eeyore.chat`: talk, as the counsellor, to a simulated client in the terminal."""
