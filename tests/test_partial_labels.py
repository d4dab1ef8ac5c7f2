"""Partial labels: what each hospital knows, and a loss that never treats the unknown
as negative."""

from __future__ import annotations

import pytest
import torch

from fedmed import config as config_mod
from fedmed.data.labels import affected_hospitals, knowledge
from fedmed.errors import FedmedError
from fedmed.training.loop import pseudo_label, set_loss

Y = torch.tensor([0, 1, 2, 3] * 5)


def cfg(*settings: str) -> config_mod.FedmedConfig:
    return config_mod.load(None, ["data.hospitals=4", "labels.hospitals=1.0", *settings])


def test_set_loss_is_cross_entropy_for_full_labels():
    logits = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    one_hot = torch.nn.functional.one_hot(y, 4).bool()
    expected = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(set_loss(logits, one_hot, torch.ones_like(one_hot)), expected)


def test_classes_a_hospital_does_not_annotate_get_zero_gradient():
    known = knowledge(cfg("labels.scenario=subset", 'labels.annotated="glioma,no_tumour"'), 0, Y)
    logits = torch.randn(len(Y), 4, requires_grad=True)
    set_loss(logits, known.possible, known.annotated).backward()
    assert torch.count_nonzero(logits.grad[:, [1, 3]]) == 0  # meningioma, pituitary: not annotated here
    assert torch.count_nonzero(logits.grad[:, [0, 2]]) > 0
    unknown = Y == 1
    assert torch.count_nonzero(logits.grad[unknown]) == 0  # an unknown image is no one's negative


def test_unlabelled_images_add_nothing_and_coarse_labels_are_a_set():
    logits = torch.randn(len(Y), 4, requires_grad=True)
    known = knowledge(cfg("labels.scenario=unlabelled"), 0, Y)
    assert (known.y == -1).all()
    loss = set_loss(logits, known.possible, known.annotated)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    coarse = knowledge(cfg("labels.scenario=coarse"), 0, Y)
    assert coarse.possible[Y == 2].all(1).logical_not().all()  # no_tumour: exactly known
    assert (coarse.y[Y == 2] == 2).all() and (coarse.y[Y != 2] == -1).all()
    assert coarse.possible[Y == 0].sum(1).eq(3).all()  # a tumour: one of the three tumour classes


def test_a_labelled_fraction_per_hospital_and_the_affected_share():
    known = knowledge(cfg("labels.scenario=fraction", "labels.fraction=0.3"), 0, Y)
    assert int((known.y >= 0).sum()) == 6
    assert len(affected_hospitals(cfg("labels.scenario=unlabelled", "labels.hospitals=0.5"))) == 2
    assert knowledge(cfg("labels.scenario=full"), 0, Y) is None


class Fixed(torch.nn.Module):
    """Sure of class 0 for even images, unsure for odd ones."""

    def forward(self, x):
        return torch.tensor([[9.0, 0.0, 0.0, 0.0], [0.3, 0.2, 0.1, 0.0]]).expand(len(x) // 2, 2, 4).reshape(len(x), 4)


def test_pseudo_labels_take_confident_predictions_only():
    possible = torch.ones(4, 4, dtype=torch.bool)
    out, annotated, taken = pseudo_label(Fixed(), torch.zeros(4, 1, 8, 8), possible, possible.clone(), threshold=0.9)
    assert taken == 2
    assert out[0].tolist() == [True, False, False, False] and out[1].all()
    assert annotated.all()


def test_a_subset_hospitals_unknown_image_may_be_pseudo_labelled_as_a_class_it_does_not_annotate():
    annotated = torch.tensor([[False, True, True, True]]).expand(4, 4).clone()  # class 0 not annotated here
    possible = annotated.clone()  # every image unknown
    out, new_annotated, taken = pseudo_label(Fixed(), torch.zeros(4, 1, 8, 8), possible, annotated, threshold=0.9)
    assert taken == 2
    assert out[0].tolist() == [True, False, False, False] and new_annotated[0].all()  # now trains over all classes
    assert torch.equal(out[1], possible[1]) and torch.equal(new_annotated[1], annotated[1])  # unsure: unchanged


@pytest.mark.parametrize(
    ("setting", "needle"),
    [("labels.fraction=1.5", "`labels.fraction`"), ('labels.annotated="astrocytoma"', "labels.annotated names astrocytoma")],
)
def test_bad_partial_label_settings(setting, needle):
    with pytest.raises(FedmedError, match=needle):
        knowledge(cfg("labels.scenario=subset", setting), 0, Y)


def test_subset_settings_that_cannot_work_are_refused():
    with pytest.raises(FedmedError, match="two or more classes"):
        knowledge(cfg("labels.scenario=subset", 'labels.annotated="glioma"'), 0, Y)
    known = knowledge(cfg("labels.scenario=subset", 'labels.annotated="glioma,no_tumour"'), 0, Y)
    assert (known.y[(Y == 1) | (Y == 3)] == -1).all()  # what the hospital does not know stays unknown


def test_fedbn_hospitals_keep_normalisation_arrays_out_of_their_reply(tmp_path):
    from dataclasses import replace

    from fedmed.data.sites import SiteData
    from fedmed.federation.client_app import Request, _own_file, _shared_arrays
    from fedmed.ledger.hospital import HospitalLedger
    from fedmed.models import build_model, load_layers, norm_keys

    settings = cfg("federation.strategy=fedbn")
    model = build_model(settings.model, 4, seed=0)
    ledger = HospitalLedger.open(tmp_path, "0123456789abcdef", "hospital-01")
    request = Request(settings, None, 1, SiteData("hospital-01", 0, None, None), model, model.state_dict(), 0, ledger, 0.0, settings.train)
    sent = _shared_arrays(request)
    kept = norm_keys(model)
    assert kept and not kept & set(sent.keys())
    assert set(load_layers(_own_file(ledger, "hospital-01", "fedbn"))) == kept  # at the hospital, on its disk
    assert set(_shared_arrays(replace(request, cfg=cfg())).keys()) == set(model.state_dict())
