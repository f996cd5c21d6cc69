"""The studio: web pages for the people in the loop (`python -m eeyore.studio`).

Practice (trainees chat with the simulated client), Annotate (experts choose between two client
replies: round-2 DPO records) and Profiles (experts validate and edit extracted profiles).
"""
