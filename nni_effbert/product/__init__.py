"""What a user takes home: the export folder format (``export``), the exported students and
their baseline (``students``), final distillation (``distill``), the report and its plots
(``report``, ``plots``), and the whole pipeline on the embedded quickstart config
(``quickstart``)."""
