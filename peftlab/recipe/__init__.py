"""The recipe: the typed sections and :class:`Recipe` (``schema``), YAML in with ``--set`` overrides and
did-you-mean messages (``parse``), and the recipe stored beside an adapter, read as untrusted input
(``from_adapter``).
"""
