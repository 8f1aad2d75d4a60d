"""Process set-up shared by the command line and the trial entry: logging and CPU threads.

Only entry points call these (``nni-effbert``, ``python -m nni_effbert.trial``); library code
never configures logging or threads of its own.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["configure_runtime", "silence_import_warnings", "configure_threads"]


def configure_runtime(verbose: bool = False, quiet: bool = False) -> None:
    """Logging to stderr and silence for known third-party import noise (entry processes only).

    ``quiet`` also turns off the ``datasets`` progress bars (``Generating train split``,
    ``Map``) and those of ``huggingface_hub`` / ``transformers`` (``Loading weights``,
    ``Writing model shards``), so ``-q`` prints warnings and results only.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    silence_import_warnings()
    for name in ("nni", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    if quiet:
        # Read by ``datasets`` when it is imported; importing it here would cost the --help path.
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        # transformers reads huggingface_hub's switch when it is imported.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def silence_import_warnings() -> None:
    """Ignore the warnings nni 3.0 / lightning emit at import on current torch and setuptools:
    harmless, and they would bury our one-line messages. Entry points call this before they
    import the library."""
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated")
    warnings.filterwarnings("ignore", message=r".*is found to be not a nn\.Module")


def configure_threads(cfg) -> int:
    """Give each of ``search.trial_concurrency`` concurrent trials its share of the CPU cores.

    OpenMP threads that outnumber the free cores spin against each other and make every
    forward several times slower, so a trial uses ``cpu_count // trial_concurrency`` threads
    (at least 1). An explicit ``OMP_NUM_THREADS`` is respected. Returns the thread count.
    """
    import torch  # local: the CLI's --help path imports this module and must stay fast

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 1) // max(1, int(cfg.search.trial_concurrency)))
    torch.set_num_threads(threads)
    return threads
