"""Teacher-labelled augmentation: deterministic rows, neighbours from the training rows, cached teacher logits."""
import numpy as np
import pytest
import torch

from common.errors import ConfigError
from workers.augment import NO_LABEL, AugmentConfig, Augmenter, job_problems, neighbour_table
from workers.data import Split, TaskConfig, encode, load

ROWS = ["the movie was good and fun", "a bad boring film", "this story is really awful", "one great actor"]


def _embeddings(vocab: int = 1000, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(vocab, width)).astype(np.float32)


def test_neighbours_are_the_nearest_by_cosine():
    e = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]], dtype=np.float32) * [[1], [3], [1], [2], [1]]
    table = neighbour_table(e, np.array([0, 1, 2, 3, 4]), 1)
    assert table[:, 0].tolist() == [1, 0, 3, 2, 2]
    # only among the candidates given: 0's nearest is 1, but 1 is not a candidate
    assert neighbour_table(e, np.array([0, 3, 4]), 1)[:, 0].tolist() == [3, 0, 3]


def test_augmented_rows_are_deterministic_per_seed(tiny_tokenizer):
    cfg = AugmentConfig(copies=3, replace_prob=0.5, mask_prob=0.2, seed=1)
    rows = Augmenter(cfg, tiny_tokenizer, _embeddings(), ROWS).rows(ROWS)
    assert len(rows) == 3 * len(ROWS)
    assert rows == Augmenter(cfg, tiny_tokenizer, _embeddings(), ROWS).rows(ROWS)
    other = Augmenter(cfg.model_copy(update={"seed": 2}), tiny_tokenizer, _embeddings(), ROWS).rows(ROWS)
    assert other != rows
    # a row's copies do not depend on the other rows
    assert Augmenter(cfg, tiny_tokenizer, _embeddings(), ROWS).rows(ROWS[:2])[:2] == rows[:2]
    assert any(r != tiny_tokenizer.backend_tokenizer.normalizer.normalize_str(o) for r, o in zip(rows, ROWS * 3))


def test_replacements_come_only_from_words_of_the_training_rows(tiny_tokenizer):
    aug = Augmenter(AugmentConfig(copies=2, replace_prob=1.0, mask_prob=0.0), tiny_tokenizer, _embeddings(), ROWS)
    training_words = {w for r in ROWS for w in r.split()}
    assert set(aug.neighbours) == training_words
    for row in aug.rows(ROWS):
        assert all(w in training_words for w in row.split())
    # every word had a neighbour and was replaced: none stays in place
    assert all(a != b for row, orig in zip(aug.rows(ROWS), ROWS * 2) for a, b in zip(row.split(), orig.split()))


def test_masking_and_pairs_augmented_side_by_side(tiny_tokenizer):
    pairs = [("the movie was good", "a great film"), ("bad plot", "the story was dull")]
    masked = Augmenter(AugmentConfig(copies=1, replace_prob=0.0, mask_prob=1.0), tiny_tokenizer, _embeddings(),
                       pairs).rows(pairs)
    assert masked[0] == ("[MASK] [MASK] [MASK] [MASK]", "[MASK] [MASK] [MASK]")
    enc = encode(Split(masked, np.full(2, NO_LABEL)), tiny_tokenizer, 32)
    assert (enc.input_ids[0, 1:5] == tiny_tokenizer.mask_token_id).all()
    assert set(np.unique(enc.token_type_ids[0, :enc.lengths[0]])) == {0, 1}  # still a pair
    mixed = Augmenter(AugmentConfig(copies=4, replace_prob=0.5, mask_prob=0.3, seed=3), tiny_tokenizer,
                      _embeddings(), pairs).rows(pairs)
    assert all(isinstance(r, tuple) and len(r) == 2 for r in mixed)


def test_bad_settings_are_one_line_errors_naming_the_field():
    for bad, field in (({"copies": -1}, "task.augment.copies"), ({"replace_prob": 1.5}, "task.augment.replace_prob"),
                       ({"mask_prob": -0.1}, "task.augment.mask_prob")):
        with pytest.raises(ConfigError) as err:
            TaskConfig(augment=bad)
        assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)
    (path, message), = job_problems(AugmentConfig(copies=4), alpha=0.0, alpha_searched=False)
    assert path == "task.augment.copies" and "distill.alpha" in message and "\n" not in message
    assert job_problems(AugmentConfig(copies=4), alpha=0.5, alpha_searched=False) == []
    assert job_problems(AugmentConfig(copies=0), alpha=0.0, alpha_searched=False) == []


def test_kd_loss_on_a_batch_of_augmented_rows_is_the_soft_term_alone():
    from workers.distill import kd_loss

    s, t = torch.tensor([[1.0, -1.0], [0.2, 0.4]]), torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    only_soft = kd_loss(s, t, torch.tensor([NO_LABEL, NO_LABEL]), 2.0, 0.7)
    assert torch.isfinite(only_soft) and torch.allclose(only_soft, 0.7 * kd_loss(s, t, torch.tensor([0, 1]), 2.0, 1.0))
    mixed = kd_loss(s, t, torch.tensor([0, NO_LABEL]), 2.0, 0.0)
    assert torch.allclose(mixed, torch.nn.functional.cross_entropy(s[:1], torch.tensor([0])))


@pytest.fixture(scope="module")
def augmented_task(tiny_task_dir):
    return load(TaskConfig(dataset=str(tiny_task_dir), train_size=64, eval_size=32, max_length=32,
                           augment={"copies": 2, "replace_prob": 0.4, "mask_prob": 0.1, "seed": 5}))


def test_teacher_labels_augmented_rows_once_and_its_cached_logits_match_a_fresh_pass(tiny_teacher_dir,
                                                                                      augmented_task, tmp_path):
    from workers import artifacts
    from common.trial_config import TeacherTrainConfig
    from workers.evaluate import predict_logits
    from workers.teacher import prepare

    settings = TeacherTrainConfig(lr=1e-3, epochs=1, batch_size=16)
    t = prepare(str(tiny_teacher_dir), augmented_task, settings, tmp_path, latency_runs=2)
    n = len(augmented_task.train)
    assert t.augmented == 2 * n and len(t.train) == 3 * n and t.train_logits.shape == (3 * n, 2)
    assert (t.train.labels[n:] == NO_LABEL).all() and (t.train.labels[:n] >= 0).all()
    net, tok, _ = artifacts.load(t.uri)
    fresh = predict_logits(net, t.train)
    assert np.allclose(fresh, t.train_logits, atol=1e-4)

    stages = []
    again = prepare(str(tiny_teacher_dir), augmented_task, settings, tmp_path, latency_runs=2,
                    on_stage=stages.append)
    assert not any(s.startswith(("augmenting", "fine-tuning")) for s in stages)
    assert np.array_equal(again.train.input_ids, t.train.input_ids)
    assert np.array_equal(again.train_logits, t.train_logits)
    # other augmentation settings: new rows from the same teacher, no second fine-tune
    other_task = load(augmented_task.config.model_copy(update={"augment": AugmentConfig(copies=1, seed=6)}))
    stages = []
    other = prepare(str(tiny_teacher_dir), other_task, settings, tmp_path, latency_runs=2, on_stage=stages.append)
    assert other.uri == t.uri and other.augmented == n and "fine-tuning" not in stages
    assert any(s.startswith("augmenting") for s in stages)


def test_students_train_on_original_and_augmented_rows(tiny_bert, tiny_teacher_dir, augmented_task, tmp_path):
    from common.trial_config import DistillConfig, TeacherTrainConfig, TrainConfig
    from workers.distill import distill
    from workers.teacher import prepare

    t = prepare(str(tiny_teacher_dir), augmented_task, TeacherTrainConfig(lr=1e-3, epochs=1, batch_size=16),
                tmp_path, latency_runs=2)
    res = distill(tiny_bert, t.train, DistillConfig(alpha=0.9), TrainConfig(epochs=1, batch_size=16),
                  teacher_logits=t.train_logits)
    # an epoch is one pass over every row, augmented ones included: three times the original rows' steps
    assert res.steps == 3 * len(augmented_task.train) // 16 and np.isfinite(res.loss)
