"""The recipe: one typed, validated description of a run (``schema``), read from YAML with overrides
and did-you-mean messages (``load``), and the recipe stored beside an adapter, read as untrusted input
(``from_adapter``).
"""
