"""KD on a transfer set (distill.transfer_file): unlabeled in-domain text distilled with the task
loss against the teacher's soft labels, between general and task KD (issue 26, part 2)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import nni_effbert.kd.cache as cache_mod
import nni_effbert.kd.train as kd_train_mod
from nni_effbert.config import ConfigError, load_config
from nni_effbert.kd.setup import KDSetup
from nni_effbert.nas.kd_evaluator import KDEvaluator
from nni_effbert.nas.warmup import run_warmup
from nni_effbert.product.distill import _transfer_source, plan_distill, run_distill
from nni_effbert.product.students import export_trial_arch
from conftest import finetune_teacher_into

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny" / "effbert.yml"

pytestmark = pytest.mark.usefixtures("one_thread")


def _sentences(path: Path, n: int, skip: int = 0):
    lines = path.read_text(encoding="utf-8").splitlines()[1 + skip:1 + skip + n]
    return [line.split("\t")[0] for line in lines]


@pytest.fixture(scope="module")
def transfer_file(tmp_path_factory, glue_dir):
    """Unseen SST-2 train sentences (the subset reads only the first rows), plus 6 dev sentences
    that must be dropped."""
    unseen = _sentences(glue_dir / "SST-2" / "train.tsv", 40, skip=5000)
    dev = _sentences(glue_dir / "SST-2" / "dev.tsv", 6)
    path = tmp_path_factory.mktemp("transfer") / "in_domain.txt"
    path.write_text("\n".join(unseen + dev) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, base_teacher, glue_dir, transfer_file):
    work = tmp_path_factory.mktemp("work")
    cfg = load_config(TINY, [
        f"workdir={work}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}",
        "task.max_train_rows=64", "task.max_dev_rows=16", "task.search_rows=16",
        "warmup.batch_size=8", "evaluator.batch_size=8", "evaluator.latency_repeats=1",
        "distill.general_steps=1", "distill.task_steps=2", "distill.batch_size=8", "distill.eval_interval=0",
        f"distill.transfer_file={transfer_file}", "distill.transfer_steps=6"])
    finetune_teacher_into(cfg)
    return cfg


def test_transfer_kd_trains_on_no_dev_or_search_row_and_caches_the_teacher_once(cfg, monkeypatch):
    setup = KDSetup.from_config(cfg, progress=False)
    run_warmup(cfg, 0, steps=1, general_steps=0, progress=False, setup=setup)
    evaluator = KDEvaluator(cfg, stage=0, report=False, progress=False, latency=False, setup=setup)
    info = export_trial_arch(cfg, setup.space.bert_arch(), 0, "transfer-check", evaluator=evaluator)
    held_out = {tuple(ids) for split in (setup.task.dev, setup.task.search) for ids in split["input_ids"]}
    drawn = []
    real = kd_train_mod.iterate_batches

    def recording(dataset, *args, **kwargs):
        for batch in real(dataset, *args, **kwargs):
            drawn.append([tuple(int(t) for t, m in zip(row, mask) if m)
                          for row, mask in zip(batch["input_ids"], batch["attention_mask"])])
            yield batch

    builds = []
    real_build = cache_mod._build

    def counting_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(kd_train_mod, "iterate_batches", recording)
    monkeypatch.setattr(cache_mod, "_build", counting_build)
    result = run_distill(cfg, info.path, force=True, progress=False, setup=setup)
    assert len(drawn) == 1 + 6 + 2  # general, transfer, task steps
    transfer_rows = {row for batch in drawn[1:7] for row in batch}
    assert len(transfer_rows) > 8 and not transfer_rows & held_out
    assert not transfer_rows & {tuple(ids) for ids in setup.task.train["input_ids"]}  # the file's own lines
    assert result.plan.to_dict()["transfer_steps"] == 6
    assert builds, "the transfer set's teacher outputs were never cached"
    first = len(builds)
    run_distill(cfg, info.path, force=True, progress=False, setup=setup)
    assert len(builds) == first  # a second distillation (another seed, the baseline) builds no cache again


def test_transfer_file_lines_equal_to_dev_or_search_rows_are_dropped(cfg, tmp_path):
    setup = KDSetup.from_config(cfg, progress=False)
    held = [setup.tokenizer.decode(ids, skip_special_tokens=True)
            for split in (setup.task.dev, setup.task.search) for ids in split["input_ids"][:4]]
    unseen = Path(cfg.distill.transfer_file).read_text(encoding="utf-8").splitlines()[:20]
    path = tmp_path / "mixed.txt"
    path.write_text("\n".join(unseen + held) + "\n", encoding="utf-8")
    mixed = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, transfer_file=str(path)))
    kept, _, desc = _transfer_source(setup, mixed, plan_distill(mixed))
    kept_ids = {tuple(ids) for ids in kept["input_ids"]}
    assert not kept_ids & {tuple(ids) for split in (setup.task.dev, setup.task.search) for ids in split["input_ids"]}
    assert len(kept) <= len(unseen) < len(unseen) + len(held)  # the 8 held-out sentences are gone
    assert len(kept) >= len(unseen) - 1 and "transfer set" in desc


def test_transfer_set_config_is_checked_in_one_line(tmp_path, base_teacher, glue_dir, transfer_file):
    common = [f"workdir={tmp_path}", f"teacher.model={base_teacher}", f"task.data_dir={glue_dir}"]
    with pytest.raises(ConfigError, match="transfer_steps needs transfer_file") as err:
        load_config(TINY, common + ["distill.transfer_steps=5"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="transfer_steps is 0"):
        load_config(TINY, common + [f"distill.transfer_file={transfer_file}"])
    with pytest.raises(ConfigError, match="sentence pairs") as err:
        load_config(TINY, common + ["task.name=rte", f"distill.transfer_file={transfer_file}", "distill.transfer_steps=5"])
    assert "distill.transfer_file" in str(err.value) and "\n" not in str(err.value)
    plain = plan_distill(load_config(TINY, common))
    assert "transfer_steps" not in plain.to_dict()  # earlier distill records keep matching their plan
