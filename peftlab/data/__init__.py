"""The data pipeline: recipe ``data:`` section -> examples/packs -> batches.

``pipeline.build_data`` is the entry point (what the trainer, eval and the CLI call); ``collate`` turns
examples into batches. Module map: ``config`` (recipe schema) -> ``sources`` (files, hub, rows with locations)
-> ``formats`` (canonical records) -> ``templates`` (chat rendering, trained spans) -> ``tokenize`` (ids +
labels from offsets) -> ``build`` (eval split, overlength, mixture) -> ``packing`` -> ``collate``; ``cache``
(tokenized data built once across processes), ``streaming`` (data larger than memory), ``stats`` and
``preview`` (``peftlab data``) around them; ``augment`` (recipe ``augment:``, with the synonym ``lexicon``)
re-tokenizes augmented training rows per epoch for the trainer's batches.
"""
