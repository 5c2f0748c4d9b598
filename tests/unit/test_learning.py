"""Models, task types, the M-Fed loss term and local training."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from mfed import registry
from mfed.artifacts.signature import SignatureMismatch
from mfed.learning.data import Split
from mfed.learning.encoders import ArchError, build_encoder
from mfed.learning.model import build_site_model, part_state, signature
from mfed.learning.shapes import InputSpec
from mfed.learning.tasks import TaskError, build_task
from mfed.learning.train import Objective, compute_losses, decoder_distance, evaluate, train_local
from mfed.spec import ArchSpec, Regularizer, TaskSpec

CLS = TaskSpec(name="cls10", type="classification", params={"num_classes": 10})
SHAPE = InputSpec.image(1, 28, 28)


def _model(task=CLS, decoder=ArchSpec(name="mlp"), encoder=ArchSpec(name="small_cnn"), seed=0):
    torch.manual_seed(seed)
    return build_site_model(encoder, task, decoder)


def test_parameters_are_named_by_owner_and_stage():
    model, _ = _model()
    names = list(part_state(model, "encoder")) + list(part_state(model, "decoder"))
    assert all(n.startswith(("encoder.stages.", "decoder.")) for n in names)
    assert {n.split(".")[2] for n in names if n.startswith("encoder.")} == {"0", "1", "2"}


def test_resnet_encoder_has_about_eleven_million_parameters_and_named_stages():
    encoder = build_encoder(ArchSpec(name="resnet"))
    count = sum(p.numel() for p in encoder.parameters())
    assert 10_500_000 < count < 11_500_000
    out = encoder(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 512)
    assert len(encoder.stages) == 6


def test_encoder_signature_mismatch_names_the_first_differing_parameter():
    small, _ = _model()
    wider, _ = _model(encoder=ArchSpec(name="small_cnn", params={"channels": [16, 64]}))
    with pytest.raises(SignatureMismatch) as info:
        signature(small, "encoder").require_equal(signature(wider, "encoder"))
    assert info.value.param == "encoder.stages.0.0.bias"


@pytest.mark.parametrize(
    ("task", "decoder", "out_shape"),
    [
        (CLS, "mlp", (4, 10)),
        (TaskSpec(name="c4", type="label_map", params={"label_map": [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]}), "mlp", (4, 4)),
        (TaskSpec(name="d", type="denoise", params={"sigma": 0.5}), "upsample", (4, 1, 28, 28)),
        (TaskSpec(name="r", type="rotation"), "mlp", (4, 4)),
        (TaskSpec(name="g", type="regression", params={"target": "mean_intensity"}), "mlp", (4, 1)),
    ],
)
def test_every_task_type_builds_a_decoder_with_the_right_output(task, decoder, out_shape):
    model, _ = _model(task=task, decoder=ArchSpec(name=decoder))
    assert tuple(model(torch.rand(4, 1, 28, 28)).shape) == out_shape


def test_a_decoder_that_cannot_produce_the_task_output_is_refused():
    with pytest.raises(ArchError, match="use decoder 'upsample'"):
        _model(task=TaskSpec(name="d", type="denoise"), decoder=ArchSpec(name="mlp"))


def test_label_map_maps_fine_labels_to_coarse_classes():
    task = build_task("label_map", {"label_map": [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]}, SHAPE)
    _, targets = task.eval_pairs(torch.zeros(4, 1, 28, 28), torch.tensor([9, 1, 5, 8]), seed=0)
    assert targets.tolist() == [2, 1, 2, 3]


def test_rotation_targets_are_the_quarter_turns_applied():
    task = build_task("rotation", {}, SHAPE)
    x = torch.rand(16, 1, 28, 28)
    inputs, turns = task.eval_pairs(x, torch.zeros(16), seed=3)
    for i in range(16):
        assert torch.equal(inputs[i], torch.rot90(x[i], int(turns[i]), dims=(1, 2)))
    _, turns_again = task.eval_pairs(x, torch.zeros(16), seed=3)
    assert torch.equal(turns, turns_again)


def test_psnr_is_higher_for_a_better_reconstruction():
    task = build_task("denoise", {"sigma": 0.5}, SHAPE)
    clean = torch.rand(8, 1, 28, 28)
    assert float(task.metric_sum(clean + 0.01, clean)) > float(task.metric_sum(clean + 0.1, clean))
    assert float(task.metric_sum(clean + 0.1, clean)) / 8 == pytest.approx(20.0, abs=0.01)


def test_unknown_task_parameters_and_types_are_refused_with_the_choices():
    with pytest.raises(TaskError, match="num_classes"):
        build_task("classification", {"classes": 3}, SHAPE)
    with pytest.raises(
        registry.UnknownPlugin, match=r"unknown task type 'segmentation3d'.*available: .*classification"
    ):
        build_task("segmentation3d", {}, SHAPE)


def test_users_add_task_types_through_the_entry_point_group(tmp_path, monkeypatch):
    package = tmp_path / "acme_tasks.py"
    package.write_text(
        textwrap.dedent("""
        from mfed.learning.tasks import Classification

        class Binary(Classification):
            allowed_params = {"num_classes": 2}
    """)
    )
    dist = tmp_path / "acme_tasks-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-tasks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mfed.tasks]\nbinary = acme_tasks:Binary\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    try:
        task = build_task("binary", {}, SHAPE)
        assert task.num_classes == 2  # type: ignore[attr-defined]
    finally:
        registry.refresh()
        sys.modules.pop("acme_tasks", None)


def test_l2_term_is_half_mu_times_squared_distance_to_the_task_decoder():
    model, task = _model()
    global_model, _ = _model(seed=1)
    mu = 0.3
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    losses = compute_losses(
        model, task, x, y, Objective(regularizer=Regularizer.L2, mu=mu, global_decoder=global_model.decoder)
    )
    expected = 0.0
    for (_, a), (_, b) in zip(model.decoder.named_parameters(), global_model.decoder.named_parameters(), strict=True):
        expected += float(((a - b) ** 2).sum().detach())
    values = {k: float(v.detach()) for k, v in losses.items()}
    assert values["regularizer"] == pytest.approx(0.5 * mu * expected, rel=1e-5)
    assert values["total"] == pytest.approx(values["task"] + values["regularizer"], rel=1e-6)


def test_l2_gradient_pulls_the_local_decoder_toward_the_global_decoder():
    model, task = _model()
    global_model, _ = _model(seed=1)
    before = float(decoder_distance(model.decoder, global_model.decoder).detach())
    optimizer = torch.optim.SGD(model.decoder.parameters(), lr=0.1)
    objective = Objective(regularizer=Regularizer.L2, mu=1.0, global_decoder=global_model.decoder)
    losses = compute_losses(model, task, torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), objective)
    optimizer.zero_grad()
    losses["regularizer"].backward()
    optimizer.step()
    assert float(decoder_distance(model.decoder, global_model.decoder).detach()) < before


def test_distillation_term_vanishes_when_decoders_agree_and_grows_when_they_do_not():
    model, task = _model()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    same = compute_losses(
        model, task, x, y, Objective(regularizer=Regularizer.DISTILL, mu=1.0, global_decoder=model.decoder)
    )
    other, _ = _model(seed=5)
    different = compute_losses(
        model, task, x, y, Objective(regularizer=Regularizer.DISTILL, mu=1.0, global_decoder=other.decoder)
    )
    assert float(same["regularizer"].detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(different["regularizer"].detach()) > 1e-4


def _toy_split(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return Split(rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64))


def test_training_is_deterministic_under_a_seed_on_cpu():
    states = []
    for _ in range(2):
        model, task = _model()
        train_local(
            model,
            task,
            _toy_split(),
            epochs=1,
            batch_size=32,
            learning_rate=1e-3,
            objective=Objective(regularizer=Regularizer.NONE, mu=0, global_decoder=None),
            device=torch.device("cpu"),
            seed=42,
        )
        states.append(part_state(model, "encoder"))
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key])


def test_training_counts_steps_and_respects_max_steps():
    model, task = _model()
    stats = train_local(
        model,
        task,
        _toy_split(n=100),
        epochs=2,
        batch_size=32,
        learning_rate=1e-3,
        objective=Objective(regularizer=Regularizer.NONE, mu=0, global_decoder=None),
        device=torch.device("cpu"),
        seed=0,
        max_steps=5,
    )
    # 100 examples in batches of 32: 32, 32, 32, 4 in epoch one, then one more batch of 32.
    assert (stats.steps, stats.examples) == (5, 132)


def test_training_reduces_the_task_loss_on_learnable_data():
    model, task = _model()
    split = _toy_split(n=64)
    split = Split(split.x, (split.x.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64))  # a learnable rule
    before = evaluate(model, task, split, device=torch.device("cpu"), seed=0)
    train_local(
        model,
        task,
        split,
        epochs=15,
        batch_size=16,
        learning_rate=3e-3,
        objective=Objective(regularizer=Regularizer.NONE, mu=0, global_decoder=None),
        device=torch.device("cpu"),
        seed=0,
    )
    assert evaluate(model, task, split, device=torch.device("cpu"), seed=0) > before
