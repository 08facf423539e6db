import numpy as np
import pytest

from workers.data import TaskConfig, encode, load
from common.errors import ConfigError, DataError


@pytest.mark.glue
def test_sst2_local_subset_is_seeded_and_sized():
    a = load(TaskConfig(dataset="glue/sst2", train_size=300, eval_size=50, seed=3))
    b = load(TaskConfig(dataset="glue/sst2", train_size=300, eval_size=50, seed=3))
    c = load(TaskConfig(dataset="glue/sst2", train_size=300, eval_size=50, seed=4))
    assert len(a.train) == 300 and len(a.eval) == 50
    assert a.train.texts == b.train.texts and a.train.texts != c.train.texts
    assert a.label_names == ("0", "1") and set(np.unique(a.train.labels)) <= {0, 1}
    assert "SST-2" in a.source


def test_known_name_reads_the_glue_layout_under_the_data_dir(tmp_path, monkeypatch):
    from conftest import write_tiny_sentiment

    sst2 = write_tiny_sentiment(tmp_path / "glue" / "SST-2", train=400, eval=60)
    (sst2 / "validation.tsv").rename(sst2 / "dev.tsv")  # GLUE names its eval split dev
    for name in ("train.tsv", "dev.tsv"):  # GLUE's column is "sentence"
        path = sst2 / name
        path.write_text(path.read_text().replace("text\tlabel", "sentence\tlabel", 1))
    monkeypatch.setenv("SLIMRAY_DATA_DIR", str(tmp_path))
    a = load(TaskConfig(dataset="glue/sst2", train_size=300, eval_size=50, seed=3))
    again = load(TaskConfig(dataset="glue/sst2", train_size=300, eval_size=50, seed=3))
    other = load(TaskConfig(dataset="glue/sst2", train_size=300, eval_size=50, seed=4))
    # the selection split takes its 500-row floor, capped at half of the 400 rows; train_size takes what is left
    assert a.source == str(sst2) and (len(a.train), len(a.select), len(a.eval)) == (200, 200, 50)
    assert a.train.texts == again.train.texts and a.train.texts != other.train.texts
    assert a.label_names == ("0", "1")


@pytest.mark.glue
def test_full_dev_set_and_pairs():
    sst = load(TaskConfig(dataset="glue/sst2", train_size=10))
    assert len(sst.eval) == 872 and int(sst.eval.labels.sum()) == 444
    mrpc = load(TaskConfig(dataset="glue/mrpc"))
    assert (len(mrpc.train), len(mrpc.select)) == (3668 - 500, 500) and len(mrpc.eval) == 408
    assert isinstance(mrpc.train.texts[0], tuple) and len(mrpc.train.texts[0]) == 2
    assert int(mrpc.eval.labels.sum()) == 279
    assert mrpc.config.metric == "accuracy_f1"


def test_local_jsonl_and_csv(tmp_path):
    d = tmp_path / "task"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    (d / "validation.csv").write_text("text,label\nfine,pos\n")
    data = load(TaskConfig(dataset=str(d), selection={"share": 0}))  # two rows: none to spare
    assert data.label_names == ("neg", "pos")
    assert list(data.train.labels) == [1, 0] and list(data.eval.labels) == [1]


def test_errors_name_the_problem(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    (d / "dev.tsv").write_text("sentence\tlabel\nok\t7\n")
    with pytest.raises(DataError, match="no column 'text'"):
        load(TaskConfig(dataset=str(d), eval_split="dev"))
    with pytest.raises(DataError, match="label '7'"):
        load(TaskConfig(dataset=str(d), text_columns=("sentence",), eval_split="dev"))
    with pytest.raises(DataError, match="no validation.tsv"):
        load(TaskConfig(dataset=str(d), text_columns=("sentence",)))
    with pytest.raises(ConfigError, match="task.max_length"):
        TaskConfig(max_length=0)
    with pytest.raises(ConfigError, match="task.metric"):
        TaskConfig(metric="bleu")


def test_encode_pads_and_batches_trim(tiny_tokenizer, tmp_path):
    pairs = "".join(f'{{"a": "the film was {"good " * i}fun", "b": "a very {"dull " * i}story", "label": {i % 2}}}\n'
                    for i in range(10))
    (tmp_path / "train.jsonl").write_text(pairs)
    (tmp_path / "validation.jsonl").write_text(pairs)
    data = load(TaskConfig(dataset=str(tmp_path), text_columns=("a", "b"), train_size=8, eval_size=4,
                           selection={"share": 0}))
    enc = encode(data.train, tiny_tokenizer, 32)
    assert enc.input_ids.shape[0] == 8 and enc.input_ids.shape[1] <= 32
    assert (enc.lengths <= 32).all() and enc.token_type_ids.max() == 1  # pairs get segment ids
    b = enc.batch([0, 1])
    assert b["input_ids"].shape[1] == int(enc.lengths[[0, 1]].max())
    assert b["attention_mask"].sum().item() == int(enc.lengths[[0, 1]].sum())
