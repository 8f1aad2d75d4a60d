"""Helpers shared by the tests and the benches (no tests here).

* :mod:`.reliability` -- a prepared tiny experiment and an nnictl experiment driver;
* :mod:`.strategy` -- the fake arch space and the synthetic objective of the strategy tests;
* :mod:`.spaces` -- an arch space as a light NNI model space (``freeze`` builds no model);
* :mod:`.teacher` -- the random tiny BERT teacher;
* :mod:`.smoke` -- a work directory made by the smoke quickstart (the ``smoke_workdir`` fixture).

The tests import them as ``support.<module>`` (pytest puts ``tests/`` on the path); the benches
as ``tests.support.<module>`` with the repository root on the path.
"""
