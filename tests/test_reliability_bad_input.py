"""Bad-input matrix over the CLI (``nni-effbert teacher|warmup|trial``): each bad input gives a
clear one-line error, a non-zero exit, and leaves the artifacts of an earlier successful run
(teacher, teacher-output cache, stage 0 supernet) byte-identical.

The work directory is prepared once (teacher fine-tuned, cache built, stage 0 warmed) and
hashed; every case runs against it and must leave every file that existed with the same hash
(a failed run may add lock files, never change or remove a file). Commands run in-process
through :func:`nni_effbert.cli.main`, which is what the console script calls.

Write permission: the tests run as root, for whom ``chmod`` denies nothing, so the unwritable
work directory is a path below a regular *file* (``mkdir`` fails with ENOTDIR, as it fails
with EACCES for a user without permission).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from support.reliability import prepare_work, tree_digest


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_vocab_file, glue_dir):
    root = tmp_path_factory.mktemp("badinput")
    prepared = prepare_work(root, tiny_vocab_file, glue_dir)
    from nni_effbert.search_spaces import EfficientBertSpace

    space = EfficientBertSpace.preset("tiny")
    good = space.bert_arch()
    (root / "good.json").write_text(json.dumps(good))
    prepared.update(space=space, good=good, vocab=tiny_vocab_file, glue=glue_dir)
    return prepared


def _data_dir(tmp: Path, glue: Path, train_text: str) -> Path:
    folder = tmp / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text(train_text)
    shutil.copy(glue / "SST-2" / "dev.tsv", folder / "dev.tsv")
    return tmp / "glue"


def _config_with(tmp: Path, ctx, mutate) -> Path:
    data = yaml.safe_load(ctx["exp"].read_text())
    mutate(data)
    path = tmp / "bad.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _arch_file(tmp: Path, ctx, change) -> str:
    arch = dict(ctx["good"])
    change(arch)
    (tmp / "arch.json").write_text(json.dumps(arch))
    return str(tmp / "arch.json")


def _other_tokenizer_teacher(tmp: Path, ctx) -> str:
    """A teacher whose tokenizer is not the one its embeddings were trained with: the tiny
    tokenizer over a 60-entry model vocabulary, so token ids run past the embedding table."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp / "other_teacher"
    tok = BertTokenizerFast.from_pretrained(str(ctx["vocab"].parent), do_lower_case=True)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=37, vocab_size=60, max_position_embeddings=64,
                                             num_labels=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


HEADER = "sentence\tlabel\n"
RAGGED = HEADER + "good movie\t1\nbad\t0\textra\n"
BAD_LABEL = HEADER + "good movie\t1\nbad movie\t7\n"

# (id, command, argv builder (tmp, ctx) -> extra argv after the command, expected message part)
CASES = [
    ("malformed-yaml", "teacher",
     lambda t, c: ["-c", str(_write(t / "m.yml", "workdir: [unclosed\ntask: {name: sst2\n"))], "malformed YAML"),
    ("unknown-key", "warmup",
     lambda t, c: ["-c", str(_config_with(t, c, lambda d: d["evaluator"].update(bogus=1)))],
     "evaluator.bogus: unknown key"),
    ("wrong-type", "trial",
     lambda t, c: ["-c", str(_config_with(t, c, lambda d: d["evaluator"].update(batch_size="many"))),
                   "--arch", str(t.parent / "x.json")], "evaluator.batch_size: expected int"),
    ("missing-teacher", "teacher",
     lambda t, c: ["-c", str(c["exp"]), "--set", f"teacher.model={t / 'no_such_teacher'}"], "no_such_teacher"),
    ("other-tokenizer-teacher", "teacher",
     lambda t, c: ["-c", str(c["exp"]), "--set", f"teacher.model={_other_tokenizer_teacher(t, c)}"], "tokenizer"),
    ("empty-tsv", "teacher",
     lambda t, c: ["-c", str(c["exp"]), "--set", f"task.data_dir={_data_dir(t, c['glue'], '')}"], "empty"),
    ("ragged-tsv", "teacher",
     lambda t, c: ["-c", str(c["exp"]), "--set",
                   "task.data_dir=" + str(_data_dir(t, c["glue"], RAGGED))],
     "ragged row"),
    ("label-outside-task", "teacher",
     lambda t, c: ["-c", str(c["exp"]), "--set",
                   "task.data_dir=" + str(_data_dir(t, c["glue"], BAD_LABEL))], "label"),
    ("arch-unknown-label", "trial",
     lambda t, c: ["-c", str(c["exp"]), "--arch", _arch_file(t, c, lambda a: a.update(layer9_width=32))],
     "layer9_width"),
    ("arch-missing-label", "trial",
     lambda t, c: ["-c", str(c["exp"]), "--arch", _arch_file(t, c, lambda a: a.pop("layer1_stack"))],
     "layer1_stack"),
    ("arch-out-of-range", "trial",
     lambda t, c: ["-c", str(c["exp"]), "--arch", _arch_file(t, c, lambda a: a.update(layer0_stack=99))],
     "layer0_stack"),
    ("impossible-budget", "warmup",
     lambda t, c: ["-c", str(c["exp"]), "--stage", "0", "--set", "search.param_budget=[1, 2]"], "budget"),
    ("truncated-checkpoint", "trial",
     lambda t, c: ["-c", str(c["exp"]), "--arch", str(c["root"] / "good.json")], "stage0.pt"),
    ("unwritable-workdir", "teacher",
     lambda t, c: ["-c", str(c["exp"]), "--set", f"workdir={_write(t / 'a_file', 'x') / 'work'}"], "a_file"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.id if hasattr(c, "id") else c[0] for c in CASES])
def test_bad_input_clear_error_and_untouched_artifacts(case, ctx, tmp_path, capsys):
    from nni_effbert import cli

    name, command, argv, expected = case
    work = ctx["work"]
    ckpt = work / "supernet" / "stage0.pt"
    saved = None
    if name == "truncated-checkpoint":
        saved = ckpt.read_bytes()
        ckpt.write_bytes(saved[: len(saved) // 3])
    try:
        before = tree_digest(work)
        args = argv(tmp_path, ctx)
        capsys.readouterr()
        rc = cli.main([command, "-q", *args])
        err = capsys.readouterr().err.strip().splitlines()
        after = tree_digest(work)
    finally:
        if saved is not None:
            ckpt.write_bytes(saved)
    assert rc != 0 and rc == 2, (rc, err)
    assert err, "no error message"
    line = err[-1]
    assert line.startswith(f"nni-effbert {command}: error: ") and expected in line, err[-5:]
    changed = {k for k in before if after.get(k) != before[k]}
    assert not changed, f"{name} changed artifacts {sorted(changed)}"
    print(f"\n{name:24} {command:8} exit {rc}: {line[:200]}")


def test_impossible_budget_refused_by_the_advisor_before_any_trial(ctx, tmp_path):
    """The advisor builds its search (and checks the budget) in its constructor, i.e. when the
    NNI dispatcher starts, before any trial is requested. NNI's early classArgs validation
    (``ProgressiveClassArgsValidator``, run by ``nnictl create``) does not check the budget."""
    from nni_effbert.strategies.nni.advisor import ProgressiveClassArgsValidator
    from nni_effbert.strategies.nni.factory import build_broker

    bad = _config_with(tmp_path, ctx, lambda d: d["search"].update(param_budget=[1, 2]))
    with pytest.raises(Exception, match="budget") as info:
        build_broker(str(bad), None, None, None, str(tmp_path / "state.json"))
    assert not (tmp_path / "state.json").exists()
    print(f"\nadvisor construction: {type(info.value).__name__}: {info.value}")
    ProgressiveClassArgsValidator().validate_class_args(config=str(bad))  # passes today: see the docstring
