"""Named sessions: what an engine knows of them, their file format and directory, and the service the HTTP side uses."""
