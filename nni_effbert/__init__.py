"""nni-effbert: EfficientBERT (Dong et al., Findings of EMNLP 2021) as a Microsoft NNI plugin.

Code map (layers bottom to top; a module imports only from its layer or below, enforced by
``tests/test_import_layers.py``):

* ``errors``, ``io``, ``typed_yaml``, ``workdir``, ``runtime``, ``hf/`` -- exceptions, atomic
  files, strict YAML -> dataclasses, the work directory layout, process set-up (logging,
  threads), the HF remote code of exports;
* ``search_spaces/`` (installed as ``nni_effbert.search_spaces``) -- the space: op table,
  searchable MLP, supernet, NNI mutables; ``strategies/`` core (stages, sampler, ask/tell);
* ``config`` -- the YAML schema and loader;
* ``data/`` -- tasks, loading, metrics; ``kd/`` -- teacher, teacher-output cache, KD losses,
  training loop, latency;
* ``nas/`` library -- trial parameters, warm-up, ``KDEvaluator``, NNI records and ranking;
* ``product/`` library -- export format, students and baseline, distillation, report, plots;
* NNI-facing -- ``nas.trial_runner`` (what NNI runs), ``nas.launcher`` (runs the nnictl or the NasExperiment driver),
  ``strategies`` adapters (``ProgressiveStrategy``, the advisor, the tuner);
* ``product.quickstart`` -- teacher -> search -> export -> distill -> report;
* ``cli`` (every ``nni-effbert`` command), ``trial`` (``python -m nni_effbert.trial``),
  ``evaluator`` (the README's ``from nni_effbert.evaluator import KDEvaluator``).

A trial, as data flows: ``arch dict`` (tuner) -> ``nas.trial_runner`` -> ``nas.kd_evaluator`` slices the
stage's supernet into a subnet -> ``kd.train`` KD fine-tune against ``kd.cache`` -> metric dict
(``nni.report_final_result``).
"""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
