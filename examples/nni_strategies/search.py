"""Reuse EfficientBERT's space and KD evaluator with NNI's own strategies in a ``NasExperiment``.

::

    nni-effbert teacher -c examples/nni_strategies/effbert.yml            # once
    nni-effbert warmup  -c examples/nni_strategies/effbert.yml --stage 0  # once: the supernet trials inherit
    python examples/nni_strategies/search.py -c examples/nni_strategies/effbert.yml --strategy evolution

Every candidate runs as an NNI trial (web UI at http://localhost:PORT) and inherits its weights
from the work directory's warm-up (``KDEvaluator``'s default for a strategy other than the
progressive one), so its score is comparable with the progressive search's: the final metric's
``default`` is ``evaluator.objective`` on the search split, with ``latency_ms``, ``params`` and
``expressions`` beside it. Without the warm-up the experiment stops before any trial with one
line naming ``nni-effbert warmup``. Afterwards ``nni-effbert export -c CONFIG --experiment ID``
exports the best trial.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from nni.nas.experiment import NasExperiment, NasExperimentConfig
from nni.nas.strategy import TPE, Random, RegularizedEvolution

from nni_effbert.errors import EffBertError, one_line
from nni_effbert.evaluator import KDEvaluator
from nni_effbert.workdir import WorkDir

STRATEGIES = {
    "random": lambda: Random(dedup=True, seed=0),
    "evolution": lambda: RegularizedEvolution(population_size=3, sample_size=2, dedup=True, seed=0),
    "tpe": lambda: TPE(),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="experiment config (effbert.yml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="evolution")
    parser.add_argument("--trials", type=int, default=8, help="number of NNI trials (candidates)")
    parser.add_argument("--port", type=int, default=8081, help="NNI web UI port")
    parser.add_argument("--summary", help="also write the top models as JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # supernet= left at its default: the work directory's warm-up for any strategy but the progressive one.
    evaluator = KDEvaluator(args.config, overrides=args.set)
    cfg = evaluator.cfg
    space = evaluator.space  # EfficientBertSpace sized for the teacher and the task

    config = NasExperimentConfig("ts", "simplified", "local")  # candidates run as NNI trials
    config.max_trial_number = args.trials
    config.trial_concurrency = cfg.search.trial_concurrency
    config.experiment_working_directory = str(WorkDir.of(cfg).root / "nni-experiments")
    config.training_service.use_active_gpu = False
    experiment = NasExperiment(space, evaluator.as_nni_evaluator(), STRATEGIES[args.strategy](), config)
    error = None
    try:
        experiment.run(port=args.port)
        top = experiment.export_top_models(top_k=3, formatter="dict")  # before stop(): it asks the engine
    except EffBertError as exc:  # e.g. no warm-up yet: stops before the first trial
        error = one_line(exc)
    finally:
        experiment.stop()
    if error is not None:
        print(f"error: {error}", file=sys.stderr)  # after stop(), whose log lines would bury it
        return 2

    if not top:
        print(f"experiment {experiment.id}: no trial succeeded (see the trials' logs in the web UI)", file=sys.stderr)
        return 1
    arch = {k: v for k, v in top[0].items() if k in space.choices}
    print(f"experiment {experiment.id}: best of {args.trials} trials ({args.strategy}):")
    for i, layer in enumerate(space.describe(arch)):
        print(f"  layer {i}: {layer['expression']}  (width {layer['width']}, stack {layer['stack']})")
    print(f"export it: nni-effbert export -c {args.config} --experiment {experiment.id}")
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            json.dump({"experiment": experiment.id, "top": top, "describe": space.describe(arch)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
