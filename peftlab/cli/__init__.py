"""The ``peftlab`` command line: the parser and ``main`` (``main``), and the commands by what they work on —
a training recipe (``training``), an adapter put to use (``inference``), merge and export (``export``).
``python -m peftlab.cli`` runs it too.
"""
