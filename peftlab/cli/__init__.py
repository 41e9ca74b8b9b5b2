"""The ``peftlab`` command line (``main``); ``python -m peftlab.cli`` runs it too.
"""
