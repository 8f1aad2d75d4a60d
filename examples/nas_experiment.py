"""EfficientBERT's progressive search as a plain NNI ``NasExperiment``.

::

    nni-effbert teacher -c examples/sst2/effbert.yml          # once: the fine-tuned teacher
    python examples/nas_experiment.py --config examples/sst2/effbert.yml --port 8081

The NNI manager runs every candidate as a trial process (watch them at
http://localhost:8081); each stage's warm-up runs in this process, through
``warmup_fn=evaluator.warmup``, before the stage's candidates go out. ``nni-effbert search
--python`` runs the same thing and also writes ``<workdir>/trials.json`` for ``report``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from nni.nas.experiment import NasExperiment, NasExperimentConfig

from nni_effbert.config import load_config
from nni_effbert.nas.kd_evaluator import KDEvaluator
from nni_effbert.strategies import ProgressiveStrategy
from nni_effbert.strategies.core import split_parameters
from nni_effbert.workdir import WorkDir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment config (effbert.yml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--port", type=int, default=8081, help="NNI web UI port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config, args.set)
    evaluator = KDEvaluator(cfg)
    space = evaluator.space  # EfficientBertSpace sized for the teacher and the task
    strategy = ProgressiveStrategy(search=cfg.search, warmup_fn=evaluator.warmup,
                                   arch_space=space)  # NNI hands the strategy a SimplifiedModelSpace

    # Training-service engine: candidates become NNI trials (web UI, logs, records).
    config = NasExperimentConfig("ts", "simplified", "local")
    config.trial_concurrency = cfg.search.trial_concurrency
    config.experiment_working_directory = str(WorkDir.of(cfg).root / "nni-experiments")
    config.training_service.use_active_gpu = False
    experiment = NasExperiment(space, evaluator.as_nni_evaluator(), strategy, config)
    evaluator.experiment = experiment.id  # warm-ups write this experiment's supernets; its candidates read them
    try:
        experiment.run(port=args.port)  # blocks until the strategy is done
    finally:
        experiment.stop()
    best = strategy.search.best()  # best candidate of the latest stage with results
    if best is None:
        print("no candidate succeeded", file=sys.stderr)
        return 1
    print(f"best arch (stage {best.stage}): strategy trial {best.trial_id}, score {best.score:.4f}, "
          f"{best.params_count} params")
    print(split_parameters(best.parameters)[0])  # the arch: label -> value
    return 0


if __name__ == "__main__":
    sys.exit(main())
