"""The search: trial parameters (``params``), the supernet warm-up (``warmup``), the KD
evaluator (``evaluator``, ``nni_evaluator``), NNI's records read back as trial dicts
(``records``) and ranked (``ranking``); above them the NNI-facing layer: the trial entry NNI
runs (``trial``) and the search drivers (``search`` = ``nnictl_search`` or ``python_search``,
sharing ``experiments``)."""
