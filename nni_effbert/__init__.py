"""nni-effbert: EfficientBERT (Dong et al., Findings of EMNLP 2021) as a Microsoft NNI plugin.

Code map (folders bottom to top; a folder imports only folders below it, and a module only
its layer or below, enforced by ``tests/test_import_layers.py``; DEVELOPERS.md has the table):

* ``errors``, ``io``, ``params``, ``workdir``, ``search_lock``, ``runtime``, ``typed_yaml``,
  ``hf/`` -- exceptions, atomic files, the trial wire format, the work directory layout and its
  search lock, process set-up (logging, threads), strict YAML -> dataclasses, the HF remote code
  of exports;
* ``search_spaces/`` (installed as ``nni_effbert.search_spaces``) -- the space: op table,
  searchable MLP, supernet, NNI mutables;
* ``strategies/`` (installed as ``nni_effbert.strategies``) -- the NNI-free search core (stages,
  sampler, ask/tell);
* ``data/`` -- tasks, loading, metrics; ``config`` -- the YAML schema and loader;
* ``kd/`` -- teacher, teacher-output cache, KD losses, training loop; ``latency/`` -- measuring,
  the latency table and its check;
* ``strategies/nni/`` -- the NNI adapters (``ProgressiveStrategy``, the advisor, the tuner, the
  broker, registration);
* ``nas/`` -- supernet checkpoints, warm-up, ``KDEvaluator``, NNI records and ranking, the trial
  (``nas.trial_runner``, what NNI runs), the two search drivers and ``nas.launcher``;
* ``product/`` -- export format, students and baselines, distillation, report, plots, and
  ``product.quickstart``: teacher -> search -> export -> distill -> report;
* ``cli`` (every ``nni-effbert`` command), ``trial`` (``python -m nni_effbert.trial``),
  ``evaluator`` (the README's ``from nni_effbert.evaluator import KDEvaluator``).

A trial, as data flows: ``arch dict`` (tuner) -> ``nas.trial_runner`` -> ``nas.kd_evaluator`` slices the
stage's supernet into a subnet -> ``kd.train`` KD fine-tune against ``kd.cache`` -> metric dict
(``nni.report_final_result``).
"""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
