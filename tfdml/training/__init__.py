"""The training application: config -> objects -> run folder.

``config`` (schema), ``build`` (config sections -> library objects),
``run_dir`` (the run folder), ``checkpoint``, ``callbacks``, ``loop`` (fit,
resume, distribution), ``report`` (test evaluation, plots, export) and
``demo``; ``train.py`` and ``export/export.py`` are CLIs over them. The
library (``tfdml.losses``, ``tfdml.models``, ...) never imports this package
(``tests/test_layers.py``). Importing it imports nothing else.
"""
